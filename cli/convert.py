"""`rwkvcpu convert` and `rwkvcpu info`: parse arguments, call rwkvcpu.quant."""

import time

import click

from rwkvcpu.formats import DTYPES


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", default="int8", show_default=True, metavar="|".join(DTYPES),
              help="Storage of the large matrices; vectors and low-rank matrices stay fp32.")
@click.option("--eps", default=None, metavar="FLOAT",
              help="Group-norm epsilon of ln_x to record (default: the source's own; "
                   "official v5-v7 and llama.cpp .gguf 64e-5, rwkv.cpp v5 1e-5).")
@click.option("--tokenizer", default=None, metavar="NAME|PATH",
              help="world, neox-20b, bytes, or a tokenizer.json to embed, of at most as many tokens "
                   "as the model has logits (default: a .gguf file's own World vocabulary, otherwise "
                   "chosen by vocabulary size).")
@click.option("--state", default=None, metavar="FILE",
              help="State-tuning file (blocks.N.att.time_state) to store as the initial state.")
@click.option("--eos-token-id", "eos", default=None, metavar="ID",
              help="End-of-text token to record, where generation stops (default: the tokenizer's "
                   "own, 0 for World); -1 for none.")
@click.option("--lora", "lora", multiple=True, metavar="ADAPTER",
              help="RWKV-PEFT LoRA or PiSSA checkpoint to merge before quantizing (repeatable).")
@click.option("--lora-alpha", "lora_alpha", multiple=True, metavar="ALPHA",
              help="The lora_alpha a LoRA adapter was trained with: once for all, or once per --lora "
                   "in order (W += alpha / rank * B A).")
@click.option("--pissa-init", "pissa_init", multiple=True, metavar="FILE",
              help="The init_pissa.pth of a PiSSA adapter given with --lora (W += B A - B0 A0).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def convert(src, dst, dtype, eps, tokenizer, state, eos, lora, lora_alpha, pissa_init, quiet):
    """Convert SRC (official .pth, rwkv.cpp .bin, llama.cpp .gguf, Hugging Face
    folder) into DST, an rwkvcpu .safetensors file.

    \b
    Examples:
      rwkvcpu convert RWKV-x070-World-0.1B.pth rwkv7-0.1b-int8.safetensors --dtype int8
      rwkvcpu convert rwkv7-0.4b-Q4_K_M.gguf rwkv7-0.4b-int4.safetensors --dtype int4
      rwkvcpu convert RWKV-x060-World-1B6.pth tuned.safetensors --lora rwkv-0.pth --lora-alpha 32
    """
    from rwkvcpu.errors import ConversionError
    from rwkvcpu.quant.convert import convert as run_convert
    from rwkvcpu.formats import get_format

    get_format(dtype)
    if eps is not None:
        try:
            eps = float(eps)
        except ValueError:
            raise ConversionError(f"--eps {eps!r} is not a number (e.g. 64e-5)") from None
    if eos is not None:
        try:
            eos = int(eos)
        except ValueError:
            raise ConversionError(f"--eos-token-id {eos!r} is not a token id (an integer, -1 for none)") from None
    alphas = []
    for a in lora_alpha:
        try:
            alphas.append(float(a))
        except ValueError:
            raise ConversionError(f"--lora-alpha {a!r} is not a number (e.g. 32)") from None
    t0 = time.perf_counter()
    meta = run_convert(src, dst, dtype=dtype, group_norm_eps=eps, tokenizer=tokenizer,
                       progress=not quiet, state=state, eos_token_id=eos, lora=lora, lora_alpha=alphas,
                       pissa_init=pissa_init)
    if not quiet:
        import os
        size = os.path.getsize(dst)
        click.echo(
            f"wrote {dst}: {meta['generation']}, {meta['n_layer']} layers x {meta['n_embd']}, "
            f"vocabulary {meta['vocab_size']}, {dtype}, {size / 1e6:.1f} MB, "
            f"tokenizer {meta['tokenizer']}, in {time.perf_counter() - t0:.1f} s", err=True)


@click.command()
@click.argument("file")
def info(file):
    """Describe FILE: an rwkvcpu model, official .pth, rwkv.cpp .bin, llama.cpp
    .gguf, Hugging Face folder, state-tuning file or RWKV-PEFT adapter
    (generation, dimensions, parameters, dtypes, size on disk, metadata)."""
    from rwkvcpu.quant.info import describe

    rows = describe(file)
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        click.echo(f"{k + ':':<{width + 1}} {v}")
