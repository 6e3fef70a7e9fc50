"""Official-layout models for the oracle, and our canonical files made from them.

    random_official(generation, ...)        -> state dict (numpy) the `rwkv` package can load
    canonical_from_official(generation, sd) -> (ModelConfig, canonical tensors), per docs/FORMAT.md
    official_from_rwkvcpp(path)             -> (generation, state dict) of a tiny rwkv.cpp FP32 fixture
    write_model(path, config, tensors, dtype) -> an rwkvcpu safetensors file
    random_models(root, generations, dtypes) -> {(generation, dtype): (Model, stored tensors, config)}

These re-derive the converter's transforms from docs/FORMAT.md on purpose: the
engine tests then do not depend on the converter, and disagreements between
the two readings of the format show up as test failures.
"""

import hashlib
import struct

import numpy as np

from rwkvcpu.config import FORMAT_NAME, FORMAT_VERSION, OFFICIAL_GROUP_NORM_EPS, ModelConfig
from rwkvcpu.layouts import MATRIX, expected_tensors
from rwkvcpu.formats import format_for_matrix, get_format

from .common import layer_norm


def random_official(generation, n_layer=2, n_embd=64, vocab_size=256, *, head_size=32, dim_ffn=None,
                    lora=16, time_state=False, seed=0):
    """A random model in the official checkpoint layout, float32, sized to give lively logits."""
    rng = np.random.default_rng(seed)
    D, V, L = n_embd, vocab_size, n_layer
    F = dim_ffn or 4 * D
    H, S = D // head_size, head_size
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    normal = lambda *shape, std=1.0: f32(rng.standard_normal(shape) * std)  # noqa: E731
    unif = lambda lo, hi, *shape: f32(rng.uniform(lo, hi, shape))  # noqa: E731
    mat = lambda o, i, gain=1.0: normal(o, i, std=gain / np.sqrt(i))  # noqa: E731
    row = lambda lo, hi: unif(lo, hi, 1, 1, D)  # noqa: E731

    sd = {"emb.weight": normal(V, D), "blocks.0.ln0.weight": 1 + normal(D, std=0.1),
          "blocks.0.ln0.bias": normal(D, std=0.1)}
    for i in range(L):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            sd[p + n + ".weight"] = 1 + normal(D, std=0.1)
            sd[p + n + ".bias"] = normal(D, std=0.1)
        a, f = p + "att.", p + "ffn."
        for n in ("receptance", "key", "value"):
            sd[a + n + ".weight"] = mat(D, D)
        sd[a + "output.weight"] = mat(D, D, 0.5)
        sd[f + "key.weight"] = mat(F, D)
        sd[f + "value.weight"] = mat(D, F, 0.5)
        if generation != "v7":
            sd[f + "receptance.weight"] = mat(D, D)
        if generation != "v4":
            sd[a + "ln_x.weight"] = 1 + normal(D, std=0.1)
            sd[a + "ln_x.bias"] = normal(D, std=0.1)

        if generation == "v4":
            for m in "kvr":
                sd[a + "time_mix_" + m] = row(0, 1)
            sd[a + "time_decay"] = unif(-3, 1, D)
            sd[a + "time_first"] = unif(-1, 1, D)
        elif generation.startswith("v5"):
            for m in ("kvr" if generation == "v5.0" else "kvrg"):
                sd[a + "time_mix_" + m] = row(0, 1)
            per = (H, S) if generation == "v5.2" else (H,)
            sd[a + "time_decay"] = unif(-3, 1, *per)
            sd[a + ("time_first" if generation == "v5.0" else "time_faaaa")] = unif(-1, 1, *per)
            if generation != "v5.0":
                sd[a + "gate.weight"] = mat(D, D)
        elif generation == "v6":
            for m in "xwkvrg":
                sd[a + "time_maa_" + m] = row(0, 1)
            sd[a + "time_maa_w1"] = normal(D, 5 * lora, std=0.1)
            sd[a + "time_maa_w2"] = normal(5, lora, D, std=0.1)
            sd[a + "time_decay"] = row(-3, 1)
            sd[a + "time_decay_w1"] = normal(D, 2 * lora, std=0.1)
            sd[a + "time_decay_w2"] = normal(2 * lora, D, std=0.1)
            sd[a + "time_faaaa"] = unif(-1, 1, H, S)
            sd[a + "gate.weight"] = mat(D, D)
        else:
            for m in "rwkvag":
                sd[a + "x_" + m] = row(0, 1)
            sd[a + "w0"] = row(-2, 1)
            sd[a + "a0"] = row(-1, 1)
            sd[a + "v0"] = row(-1, 1)
            sd[a + "k_k"] = row(0.5, 1.5)
            sd[a + "k_a"] = row(0, 1)
            sd[a + "r_k"] = normal(H, S, std=0.5)
            for n, r in (("w", lora), ("a", lora), ("v", lora), ("g", 2 * lora)):
                sd[a + n + "1"] = normal(D, r, std=0.3)
                sd[a + n + "2"] = normal(r, D, std=0.3)
            sd[f + "x_k"] = row(0, 1)
        if generation in ("v4",) or generation.startswith("v5"):
            sd[f + "time_mix_k"] = row(0, 1)
            sd[f + "time_mix_r"] = row(0, 1)
        elif generation == "v6":
            sd[f + "time_maa_k"] = row(0, 1)
            sd[f + "time_maa_r"] = row(0, 1)
        if time_state:
            # official layout [head, value, key] (the reference transposes it to [head, key, value])
            sd[a + "time_state"] = normal(H, S, S, std=0.3)
    sd["ln_out.weight"] = 1 + normal(D, std=0.1)
    sd["ln_out.bias"] = normal(D, std=0.1)
    sd["head.weight"] = mat(V, D, 2.0)
    return sd


def canonical_from_official(generation, sd, group_norm_eps=OFFICIAL_GROUP_NORM_EPS, tokenizer="bytes"):
    """Apply docs/FORMAT.md's transforms: (ModelConfig, name -> float32 array)."""
    g = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    V, D = g["emb.weight"].shape
    L = 1 + max(int(k.split(".")[1]) for k in g if k.startswith("blocks."))
    F = g["blocks.0.ffn.key.weight"].shape[0]
    head_size, lora_dims = 0, {}
    if generation.startswith("v5"):
        td = g["blocks.0.att.time_decay"]
        head_size = D // td.shape[0]
    elif generation == "v6":
        head_size = g["blocks.0.att.time_faaaa"].shape[-1]
        lora_dims = {"E_maa": g["blocks.0.att.time_maa_w1"].shape[1] // 5,
                     "E_decay": g["blocks.0.att.time_decay_w1"].shape[1]}
    elif generation == "v7":
        head_size = g["blocks.0.att.r_k"].shape[-1]
        # layer 0 may lack v1 (unused there): read the widths from the last layer
        lora_dims = {n: g[f"blocks.{L - 1}.att." + s].shape[1] for n, s in
                     (("Dw", "w1"), ("Da", "a1"), ("Dv", "v1"), ("Dg", "g1"))}
    config = ModelConfig(generation, L, D, V, F, head_size=head_size, group_norm_eps=group_norm_eps,
                         lora_dims=lora_dims, tokenizer=tokenizer)
    S = head_size
    per_channel = lambda a: np.repeat(a.reshape(-1), S) if a.size * S == D else a.reshape(-1)  # noqa: E731

    out = {"emb.weight": np.stack([layer_norm(e, g["blocks.0.ln0.weight"], g["blocks.0.ln0.bias"])
                                   for e in g["emb.weight"]])}
    for name, (shape, kind, optional) in expected_tensors(config).items():
        if name == "emb.weight":
            continue
        parts = name.split(".")
        if not name.startswith("blocks."):
            out[name] = g[name]
            continue
        p, leaf = ".".join(parts[:3]) + ".", ".".join(parts[3:])
        if leaf.startswith("time_maa_") and generation in ("v4", "v5.0", "v5.1", "v5.2"):
            out[name] = 1 - g[p + "time_mix_" + leaf[len("time_maa_"):]].reshape(-1)
        elif leaf == "log_decay":
            out[name] = -np.exp(g[p + "time_decay"])
        elif leaf == "bonus" and generation == "v4":
            out[name] = g[p + "time_first"]
        elif leaf == "decay":
            out[name] = per_channel(np.exp(-np.exp(g[p + "time_decay"])))
        elif leaf == "bonus":
            src = np.exp(g[p + "time_first"]) if generation == "v5.0" else g[p + "time_faaaa"]
            out[name] = per_channel(src)
        elif leaf == "time_state":
            if p + "time_state" in g:
                st = g[p + "time_state"]
                out[name] = st if generation == "v7" else st.transpose(0, 2, 1)
        elif generation == "v6" and leaf == "time_maa_w2":
            out[name] = g[p + leaf].transpose(0, 2, 1)
        elif kind == "lora":
            out[name] = g[p + leaf].T
        else:
            out[name] = g[p + leaf].reshape(shape)
    return config, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_model(path, config, tensors, dtype="fp32", source_sha256=None):
    """Write canonical float32 tensors as an rwkvcpu safetensors file, matrices stored at `dtype`."""
    from safetensors.numpy import save_file
    stored = {}
    for name, (shape, kind, optional) in expected_tensors(config).items():
        if name not in tensors:
            continue
        if kind == MATRIX:
            fmt = format_for_matrix(dtype, shape)
            for sfx, a in get_format(fmt).quantize(tensors[name]).items():
                stored[name + sfx] = a
        else:
            stored[name] = np.ascontiguousarray(tensors[name], dtype=np.float32)
    if source_sha256 is None:
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
        source_sha256 = h.hexdigest()
    meta = dict(config.to_metadata(), format=FORMAT_NAME, format_version=str(FORMAT_VERSION), dtype=dtype,
                source_file="test", source_sha256=source_sha256, source_format="test")
    save_file(stored, str(path), metadata=meta)
    return path


def random_models(root, generations, dtypes, seed=0):
    """Small random models (2 layers, 128 wide, 64-wide heads, 256 tokens) of each generation, stored
    at each dtype: (generation, dtype) -> (Model, stored tensors, ModelConfig). Every matrix is
    under 1 MB, so our kernels do every product."""
    import rwkvcpu
    from safetensors.numpy import load_file
    out = {}
    for i, gen in enumerate(generations):
        sd = random_official(gen, n_layer=2, n_embd=128, vocab_size=256, head_size=64, seed=seed + i)
        config, tensors = canonical_from_official(gen, sd)
        for dtype in dtypes:
            path = write_model(root / f"{gen}-{dtype}.safetensors", config, tensors, dtype=dtype)
            out[gen, dtype] = (rwkvcpu.load(path), load_file(str(path)), config)
    return out


# --------------------------------------------------------------------------- rwkv.cpp fixtures

_RWKVCPP_GENERATION = {"4v0": "v4", "5v1": "v5.0", "5v2": "v5.2", "6v0": "v6", "7v0": "v7"}


def read_rwkvcpp_fp32(path):
    """Tensors of an FP32 rwkv.cpp model file: name -> float32 array (shapes in PyTorch order)."""
    b = open(path, "rb").read()
    magic, version, n_vocab, n_embd, n_layer, data_type = struct.unpack("<6i", b[:24])
    assert magic == 0x67676D66 and data_type == 0, f"{path}: not an FP32 rwkv.cpp file"
    off, out = 24, {}
    while off < len(b):
        n_dims, key_len, dt = struct.unpack("<3i", b[off:off + 12])
        off += 12
        dims = struct.unpack(f"<{n_dims}i", b[off:off + 4 * n_dims])[::-1]
        off += 4 * n_dims
        key = b[off:off + key_len].decode()
        off += key_len
        assert dt == 0, f"{path}: tensor {key} is not FP32"
        n = int(np.prod(dims))
        out[key] = np.frombuffer(b, np.float32, n, off).reshape(dims).copy()
        off += 4 * n
    return out


def official_from_rwkvcpp(path):
    """(generation, official state dict) of an FP32 rwkv.cpp fixture, undoing what its converter did
    (see ../shared/fixtures/tiny-rwkv/README.md)."""
    stem = str(path).split("tiny-rwkv-")[1][:3]
    generation = _RWKVCPP_GENERATION[stem]
    raw = read_rwkvcpp_fp32(path)
    sd = {}
    for k, v in raw.items():
        leaf = k.split(".")[-1]
        if generation == "v4" and leaf == "time_decay":
            v = np.log(-v.astype(np.float64))
        elif generation.startswith("v5") and leaf == "time_decay":
            v = np.log(-np.log(v.astype(np.float64)))
        elif generation.startswith("v5") and leaf == "time_first":
            v = np.log(v.astype(np.float64))
        if generation.startswith("v5") and leaf in ("time_decay", "time_first", "time_faaaa"):
            v = v.reshape(v.shape[0], -1)
            v = v.reshape(-1) if v.shape[1] == 1 else v
        if generation == "v6":
            if leaf in ("time_maa_w1", "time_decay_w1", "time_decay_w2"):
                v = v.T
            elif leaf == "time_maa_w2":
                v = v.transpose(0, 2, 1)
            elif leaf == "time_faaaa":
                v = v.reshape(v.shape[0], -1)
        if generation == "v7":
            if leaf == "x_rwkvag":
                for j, m in enumerate("rwkvag"):
                    sd[k.replace("x_rwkvag", "x_" + m)] = np.asarray(v[j], np.float32).reshape(1, 1, -1)
                continue
            if leaf in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
                v = v.T
        sd[k] = np.ascontiguousarray(v, dtype=np.float32)
    return generation, sd
