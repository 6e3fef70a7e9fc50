"""Coverage-guided fuzzing of the file parsers with atheris (libFuzzer): a separate command,
not part of the test suite.

libFuzzer mutates bytes and keeps the inputs that reach new code of rwkvcpu's readers
(safetensors headers, the .pth zip and pickle, rwkv.cpp headers, the state loader, the
detection and conversion that follow). Any exception other than an RwkvCpuError is a
finding; libFuzzer's -timeout and -rss_limit_mb turn hangs and memory bombs into
findings too. Each finding is written as crash-<hash> in the current folder: reproduce
it by passing that file instead of the corpus folder.

    pip install -e '.[test,fuzz]'
    python tests/fuzz_parsers.py --write-seeds fuzz-corpus         # valid files of every format
    python tests/fuzz_parsers.py model fuzz-corpus -max_total_time=3600 -rss_limit_mb=2048 -timeout=10
    python tests/fuzz_parsers.py state fuzz-corpus/state -max_total_time=600

Targets: "model" runs rwkvcpu.load on the bytes (an rwkvcpu file is mapped and checked;
a .pth, rwkv.cpp .bin or plain safetensors file is converted in memory, to int8);
"state" runs State.load against a fixed tiny model.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def write_seeds(folder: Path) -> None:
    """Valid seed files of every format into folder/ (model files) and folder/state/."""
    from conftest import SHARED
    from hostile_files import build_seeds
    work = Path(tempfile.mkdtemp())
    seeds = build_seeds(work, SHARED)
    (folder / "state").mkdir(parents=True, exist_ok=True)
    files = list(seeds.pth.values()) + list(seeds.ours.values()) + list(seeds.ggml.values())
    for i, f in enumerate(files):
        shutil.copyfile(f, folder / f"{i:03d}-{Path(f).name}")
    shutil.copyfile(seeds.state, folder / "state" / "v7.state")
    shutil.copyfile(seeds.ours[("v7", "fp32")], folder / "state" / "model.safetensors.keep")
    print(f"wrote {len(files)} model files and a state file into {folder}")


def main(argv):
    if argv[1:2] == ["--write-seeds"]:
        write_seeds(Path(argv[2]))
        return
    import atheris

    target = argv[1]
    with atheris.instrument_imports(include=["rwkvcpu"]):
        import rwkvcpu
        from rwkvcpu.errors import RwkvCpuError
        from rwkvcpu.quant.convert import read_checkpoint  # noqa: F401 - instrumented with the rest
    case = Path(tempfile.mkdtemp()) / "case"
    model = None
    if target == "state":
        keep = next(Path(a) for a in argv[2:] if not a.startswith("-")) / "model.safetensors.keep"
        model = rwkvcpu.load(keep, threads=1)

    def one(data: bytes):
        case.write_bytes(data)
        try:
            if target == "state":
                rwkvcpu.State.load(case, model)
            else:
                rwkvcpu.load(case, dtype=None, threads=1)
        except RwkvCpuError:
            pass

    atheris.Setup([argv[0]] + argv[2:], one)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main(sys.argv)
