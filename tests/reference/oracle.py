"""Run the official `rwkv` package (strategy 'cpu fp32') on official-layout models.

The package picks its generation at import time from an environment variable
(RWKV_V7_ON selects RWKV-7 for the whole process), so each family runs in a
child process of its own:

    results = run_oracle([{"sd": state_dict, "generation": "v6", "tokens": [...]}, ...])

returns, per job, {"one": (T, V) logits fed one token at a time,
"seq": (V,) logits after feeding all tokens at once}.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent


def run_oracle(jobs):
    results = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        for v7 in (False, True):
            mine = [j for j, job in enumerate(jobs) if (job["generation"] == "v7") == v7]
            if not mine:
                continue
            spec = []
            for j in mine:
                npz = os.path.join(tmp, f"model{j}.npz")
                np.savez(npz, **jobs[j]["sd"])
                spec.append({"npz": npz, "pth": os.path.join(tmp, f"model{j}.pth"),
                             "tokens": [int(t) for t in jobs[j]["tokens"]], "out": os.path.join(tmp, f"out{j}.npz")})
            spec_path = os.path.join(tmp, f"spec{int(v7)}.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            env = dict(os.environ, RWKV_V7_ON="1" if v7 else "0", RWKV_JIT_ON="1", RWKV_CUDA_ON="0",
                       PYTHONPATH=str(_HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run([sys.executable, "-m", "reference.oracle", spec_path], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"reference rwkv package failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            for j, s in zip(mine, spec):
                with np.load(s["out"]) as z:
                    results[j] = {"one": z["one"], "seq": z["seq"]}
    return results


def _main(spec_path):
    import contextlib
    import io

    import torch
    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    for job in spec:
        with np.load(job["npz"]) as z:
            sd = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        torch.save(sd, job["pth"])
        with contextlib.redirect_stdout(io.StringIO()):
            from rwkv.model import RWKV
            model = RWKV(model=job["pth"][:-4], strategy="cpu fp32")
        state, one = None, []
        for t in job["tokens"]:
            out, state = model.forward([t], state)
            one.append(out.detach().float().numpy().copy())
        seq, _ = model.forward(list(job["tokens"]), None)
        np.savez(job["out"], one=np.array(one, np.float32), seq=seq.detach().float().numpy())


if __name__ == "__main__":
    _main(sys.argv[1])
