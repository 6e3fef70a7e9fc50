"""Run one hostile-input case in a child process with a memory limit and a timeout.

A worker process (this file run as a script) imports rwkvcpu once, compiles
its kernels on small valid models, then forks one child per case: the child
sets RLIMIT_AS to what the worker already maps plus `memory` bytes, sends its
stdout and stderr to files, runs the case (a CLI command or an API call) and
writes what happened as JSON; the worker kills it after `timeout` seconds. A
crash (a segmentation fault), a hang or a memory bomb in one case is reported
as such and the next case runs in a fresh child: each case costs a fork, not
a Python start-up.

Example:
    >>> with Sandbox(warm=["tiny.safetensors"]) as box:
    ...     r = box.run("cli", ["info", "bad.pth"])
    >>> r["exit"], r["stderr"]
    (2, 'error: bad.pth: ...\\n')
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

DEFAULT_TIMEOUT = 20.0
DEFAULT_MEMORY = 1 << 30


class Sandbox:
    """The pytest side: starts the worker and hands it cases, one at a time.

    Args:
        warm: valid model files loaded and run once in the worker before any
            case, so that children find the kernels compiled.
    """

    def __init__(self, warm=()):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   # GNU OpenMP kills a child forked after it ran; numba's own thread pool does not.
                   NUMBA_THREADING_LAYER="workqueue")
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *map(str, warm)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        ready = self._proc.stdout.readline()
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"the sandbox worker did not start: {ready!r}")

    def run(self, target: str, args, *, timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY) -> dict:
        """Run one case; returns the worker's report (see _report)."""
        self._proc.stdin.write(json.dumps({"target": target, "args": list(args), "timeout": timeout,
                                           "memory": memory}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the sandbox worker died")
        return json.loads(line)

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- the worker

def _cli(*argv):
    from rwkvcpu.cli.main import main
    main(list(argv))


def _load(path, forward=True):
    """rwkvcpu.load, then a forward pass (logits must be finite or NonFiniteError raised)."""
    import numpy as np

    import rwkvcpu
    model = rwkvcpu.load(path, threads=1)
    if forward:
        logits, _ = model.forward([0, 1 % model.config.vocab_size])
        return {"finite": bool(np.isfinite(logits).all())}
    return {}


def _describe(path):
    from rwkvcpu.quant.info import describe
    rows = describe(path)
    return {"rows": {k: str(v)[:200] for k, v in rows.items()}}


def _convert(src, dst, dtype="int8", state=None):
    from rwkvcpu.quant.convert import convert
    convert(src, dst, dtype=dtype, progress=False, state=state)
    return {}


def _state_load(state_path, model_path):
    import rwkvcpu
    model = rwkvcpu.load(model_path, threads=1)
    rwkvcpu.State.load(state_path, model)
    return {}


TARGETS = {"cli": _cli, "load": _load, "describe": _describe, "convert": _convert, "state_load": _state_load}


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(req, folder):
    import resource
    import traceback
    import warnings

    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    limit = _vm_bytes() + int(req["memory"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    report = {"exit": None, "error": None}
    api = req["target"] != "cli"
    with warnings.catch_warnings(record=True) as caught:
        if api:
            warnings.simplefilter("always")
        try:
            report.update(TARGETS[req["target"]](*req["args"]) or {})
        except SystemExit as e:
            report["exit"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - everything is reported to the test, which judges it
            from rwkvcpu.errors import RwkvCpuError
            report["error"] = {"type": type(e).__name__, "ours": isinstance(e, RwkvCpuError),
                               "message": str(e)[:4000], "traceback": traceback.format_exc()[-4000:]}
        report["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)


def _report(req) -> dict:
    """Fork, run the case in the child, wait at most req["timeout"] seconds.

    Returns a dict: status ("done", "timeout", "signal N", "exit N" when the child
    died without a report), seconds, stdout and stderr (at most 20,000 characters
    each), and the child's own report: exit (the CLI's code), error (type, ours,
    message, traceback), warnings, and the target's extras (finite, rows).
    """
    folder = tempfile.mkdtemp(prefix="rwkvcpu-case-")
    sys.stdout.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(req, folder)
        finally:
            os._exit(70)
    status, code, pause = "done", 0, 0.001
    while True:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > req["timeout"]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = "timeout"
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    seconds = time.monotonic() - t0
    out = {"status": status, "seconds": round(seconds, 3)}
    if status == "done":
        if os.WIFSIGNALED(code):
            out["status"] = f"signal {os.WTERMSIG(code)}"
        elif not os.path.exists(os.path.join(folder, "report.json")):
            out["status"] = f"exit {os.WEXITSTATUS(code)}"
    for name in ("stdout", "stderr"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                out[name] = f.read(20_000)
        except OSError:
            out[name] = ""
    try:
        with open(os.path.join(folder, "report.json")) as f:
            out.update(json.load(f))
    except (OSError, ValueError):
        pass
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    return out


def _serve(warm):
    # Everything a case may need, imported (and compiled) once, before the first fork.
    import numpy  # noqa: F401

    import rwkvcpu.cli.bench  # noqa: F401
    import rwkvcpu.cli.chat  # noqa: F401
    import rwkvcpu.cli.convert  # noqa: F401
    import rwkvcpu.cli.generate  # noqa: F401
    import rwkvcpu.cli.main  # noqa: F401
    import rwkvcpu.cli.perplexity  # noqa: F401
    import rwkvcpu.quant.convert  # noqa: F401
    import rwkvcpu.quant.info  # noqa: F401
    for path in warm:
        _load(path)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(_report(json.loads(line))), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1:])
