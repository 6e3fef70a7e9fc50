"""Official state dicts renamed into Hugging Face layouts, as each project's own conversion script does.

    transformers_names(sd) -> transformers' RwkvForCausalLM keys (RWKV-4), also the keys of the
                              Rwkv6ForCausalLM checkpoints (RWKV/v6-Finch-*-HF) llama.cpp converts
    fla_names(sd)          -> fla's RWKV7ForCausalLM keys (its convert_from_rwkv7.py mapping)

Values stay the official ones (fla stores its low-rank layers as nn.Linear, i.e. transposed).
"""

import re

import numpy as np


def transformers_names(sd):
    """Official -> transformers' RwkvForCausalLM / Rwkv6ForCausalLM keys (their convert scripts' renames)."""
    out = {}
    for name, v in sd.items():
        name = name.replace("emb.", "embeddings.", 1) if name.startswith("emb.") else name
        name = name.replace("blocks.0.ln0", "blocks.0.pre_ln")
        name = re.sub(r"blocks\.(\d+)\.att", r"blocks.\1.attention", name)
        name = re.sub(r"blocks\.(\d+)\.ffn", r"blocks.\1.feed_forward", name)
        for short, long in (("k", "key"), ("v", "value"), ("r", "receptance")):
            if name.endswith(f".time_mix_{short}"):
                name = name[: -len(short)] + long
        out[name if name == "head.weight" else "rwkv." + name] = v
    return out


def fla_names(sd):
    """Official -> fla RWKV7ForCausalLM keys (its convert_from_rwkv7.py mapping).

    Layer 0's v0/v1/v2 are dropped (fla's first layer has no value residual);
    vectors other than the token-shift x_* lose their unit dimensions.
    """
    out = {}
    glob = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    for name, v in sd.items():
        if name in glob:
            out[glob[name]] = v
            continue
        _, i, part, rest = name.split(".", 3)
        if name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue
        part = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}[part]
        if part == "attn" and re.fullmatch(r"[wvag][012]", rest):
            rest = f"{rest[0]}_lora.lora." + {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[rest[1]]
            v = v.T if not rest.endswith("bias") else v
        elif part == "attn":
            head, _, tail = rest.partition(".")
            rest = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
                    "ln_x": "g_norm"}.get(head, head) + ("." + tail if tail else "")
        if v.ndim == 3 and v.shape[:2] == (1, 1) and not rest.startswith("x_"):
            v = v.reshape(-1)
        out[f"model.layers.{i}.{part}.{rest}"] = np.ascontiguousarray(v)
    return out
