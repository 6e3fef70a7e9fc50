"""The random RWKV-6/7 models behind the llama.cpp GGUF fixtures (tests/fixtures/gguf/README.md).

    MODELS[name]          -> how that model's official checkpoint is made
    official(name)        -> its official state dict (float32 holding bf16 values), made again
                             from the seed; the tests compare each GGUF file with it
    write_hf_folder(name, dir) -> the Hugging Face folder llama.cpp's convert_hf_to_gguf.py reads:
                             fla's RWKV7ForCausalLM for v7, Rwkv6ForCausalLM for v6

Run from tests/ to write every folder: `PYTHONPATH=../benchmarks python -m reference.gguf_models OUT_DIR`.

The weights are bf16 values (as in released checkpoints), so F32, F16 and BF16
files hold them exactly (F16 up to its subnormals). The "world" model has the full
World vocabulary; its embedding and head rows repeat every 256 rows so that its
file compresses to a few hundred kB (it is committed xz-compressed).
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from checkpoints import random_official_state_dict

from .hf_layouts import fla_names, transformers_names

VOCAB_FILE = Path(__file__).resolve().parents[2] / "rwkvcpu" / "tokenizers" / "rwkv_vocab_v20230424.txt"

# name -> (generation, layers, width, vocabulary, head size, channel-mix width, low-rank widths,
#          seed, rescale_every (v6's HF config; llama.cpp divides layer i's output and ffn.value by
#          2 ** (i // rescale_every)), rows of emb/head repeated with this period (0: none))
MODELS = {
    "v7-d64": dict(generation="v7", n_layer=2, n_embd=64, vocab_size=256, head_size=32, dim_ffn=128,
                   lora_dims={"Dw": 16, "Da": 16, "Dv": 16, "Dg": 32}, seed=71),
    "v6-d64": dict(generation="v6", n_layer=2, n_embd=64, vocab_size=256, head_size=32, dim_ffn=128,
                   lora_dims={"Ew": 32, "Ed": 64}, seed=61, rescale_every=1),
    # K-quants need rows (input widths) that are multiples of 256.
    "v7-d256": dict(generation="v7", n_layer=1, n_embd=256, vocab_size=256, head_size=64, dim_ffn=256,
                    lora_dims={"Dw": 16, "Da": 16, "Dv": 16, "Dg": 32}, seed=72),
    "v6-d256": dict(generation="v6", n_layer=1, n_embd=256, vocab_size=256, head_size=64, dim_ffn=256,
                    lora_dims={"Ew": 32, "Ed": 64}, seed=62, rescale_every=1),
    "v7-world": dict(generation="v7", n_layer=2, n_embd=64, vocab_size=65536, head_size=32, dim_ffn=128,
                     lora_dims={"Dw": 16, "Da": 16, "Dv": 16, "Dg": 32}, seed=73, period=256),
}

# SHA-256 of each official state dict (names, shapes and float32 bytes in order) the committed
# fixtures were made from; a mismatch means numpy's random stream changed, not our reader.
SHA256 = {
    "v7-d64": "f5ff09b14a56cb8981011e0b1c8d3ebf77696f32b8ebbb1e04a8785bb150345e",
    "v6-d64": "d05fae64a0b66cdb36bd76ac12b5dec7ad2c71ea8dadc8fd442fd80fa253fd03",
    "v7-d256": "13d31f40cdb631907ebf6905c374c6df83dd09eb37748a4ac1906a8a651215c1",
    "v6-d256": "2e6b9d15bf7791bc9baa057ebf3bfccf2302fffc0e85702a8a2d27085b73c509",
    "v7-world": "5bab040f6cbb8566d7453859f57304806197f61f483c676e782ac3ffe594cdb2",
}


def official(name):
    """The official state dict of MODELS[name], made again from its seed."""
    spec = dict(MODELS[name])
    for k in ("rescale_every", "period"):
        spec.pop(k, None)
    gen = spec.pop("generation")
    sd = random_official_state_dict(gen, **spec)
    period = MODELS[name].get("period", 0)
    if period:
        for k in ("emb.weight", "head.weight"):
            sd[k] = np.ascontiguousarray(np.resize(sd[k][:period], sd[k].shape))
    return sd


def state_dict_sha256(sd) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(np.ascontiguousarray(v, dtype="<f4").tobytes())
    return h.hexdigest()


def _config(name):
    m = MODELS[name]
    base = {"hidden_size": m["n_embd"], "num_hidden_layers": m["n_layer"], "vocab_size": m["vocab_size"],
            "intermediate_size": m["dim_ffn"]}
    if m["generation"] == "v7":
        lora = m["lora_dims"]
        return dict(base, architectures=["RWKV7ForCausalLM"], model_type="rwkv7", head_dim=m["head_size"],
                    norm_eps=1e-5, decay_low_rank_dim=lora["Dw"], a_low_rank_dim=lora["Da"],
                    v_low_rank_dim=lora["Dv"], gate_low_rank_dim=lora["Dg"])
    return dict(base, architectures=["Rwkv6ForCausalLM"], model_type="rwkv6", head_size=m["head_size"],
                attention_hidden_size=m["n_embd"], head_size_divisor=8, layer_norm_epsilon=1e-5,
                rescale_every=m["rescale_every"])


def write_hf_folder(name, folder):
    """Write MODELS[name] as the Hugging Face folder llama.cpp's converter reads."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = official(name)
    hf = fla_names(sd) if MODELS[name]["generation"] == "v7" else transformers_names(sd)
    save_file({k: np.ascontiguousarray(v) for k, v in hf.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(_config(name), indent=1))
    # llama.cpp's RWKV vocabulary: token 0 is <s>, then one token per line of this file,
    # padded with [PADn] up to vocab_size. A small model gets the World file's first lines.
    lines = VOCAB_FILE.read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "rwkv_vocab_v20230424.txt").write_text(
        "".join(lines[:MODELS[name]["vocab_size"] - 1]), encoding="utf-8")
    return state_dict_sha256(sd)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for n in MODELS:
        print(n, write_hf_folder(n, out / n))
