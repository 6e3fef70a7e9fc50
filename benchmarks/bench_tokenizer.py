"""World tokenizer speed: rwkvcpu against the reference TRIE_TOKENIZER, in one run.

Needs the reference `rwkv` package (pip install -e '.[oracle]'). Encodes the
same texts with both, checks the ids agree, and reports MB/s and the ratio.

    python benchmarks/bench_tokenizer.py                 # dev corpus from ../shared
    python benchmarks/bench_tokenizer.py --text FILE --mb 1 --repeat 5
"""

import argparse
import os
import statistics
import time
from pathlib import Path


def best_time(fn, arg, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main():
    here = Path(__file__).resolve().parent
    default_text = Path(os.environ.get("RWKVCPU_SHARED", here.parent.parent / "shared")) / "corpus" / "dev.txt"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(default_text), help="UTF-8 text file to encode")
    ap.add_argument("--mb", type=float, default=0.5, help="megabytes of the file to encode")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is reported)")
    args = ap.parse_args()

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    from rwkvcpu.tokenizers.world import WORLD_VOCAB_FILE, WorldTokenizer

    prose = Path(args.text).read_text(encoding="utf-8")[: int(args.mb * 1e6)]
    mixed = ("日本語のテキスト 中文文本 😀🎉 def f(x):\n\treturn x ** 2\n" * 2000)
    short = ["Hello world, how are you today?"] * 2000

    t0 = time.perf_counter()
    ref = TRIE_TOKENIZER(WORLD_VOCAB_FILE)
    ref_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = WorldTokenizer()
    ours.encode("warm up the compiled kernel")
    our_load = time.perf_counter() - t0
    print(f"load: reference {ref_load:.2f} s, rwkvcpu {our_load:.2f} s")

    cases = [("prose (dev corpus)", prose), ("CJK + emoji + code", mixed)]
    for name, text in cases:
        assert ours.encode(text) == ref.encode(text), f"ids differ on {name}"
        n = len(text.encode("utf-8"))
        r, _ = best_time(ref.encode, text, args.repeat)
        o, _ = best_time(ours.encode, text, args.repeat)
        print(f"{name:>20}: {n / 1e6:6.2f} MB  reference {n / r / 1e6:6.2f} MB/s  "
              f"rwkvcpu {n / o / 1e6:7.2f} MB/s  ratio {r / o:5.1f}x")

    encode_all = lambda enc: [enc(s) for s in short]  # noqa: E731
    r, _ = best_time(lambda _: encode_all(ref.encode), None, args.repeat)
    o, _ = best_time(lambda _: encode_all(ours.encode), None, args.repeat)
    print(f"{'short strings':>20}: {len(short)} x 31 B  reference {r / len(short) * 1e6:6.2f} us each  "
          f"rwkvcpu {o / len(short) * 1e6:6.2f} us each  ratio {r / o:5.1f}x")


if __name__ == "__main__":
    main()
