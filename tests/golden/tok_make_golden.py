"""Write tests/golden/tok_world_parity.json: the parity text set and the reference's token ids.

Run with the oracle installed (pip install -e '.[oracle]'):

    python tests/golden/tok_make_golden.py

The texts are built here, deterministically; the ids come from the reference
TRIE_TOKENIZER of the `rwkv` package, so the parity test runs without it.
"""

import json
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "tok_world_parity.json"

FIXED = [
    "Hello world",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-5 0x1F",
    "人工智能是计算机科学的一个分支，它企图了解智能的实质。",
    "北京欢迎你！今天天气很好，我们去公园散步吧。",
    "日本語のテキストです。ひらがな、カタカナ、漢字が混ざっています。",
    "東京スカイツリーは、東京都墨田区押上一丁目にある電波塔である。",
    "한국어 문장도 있습니다. 안녕하세요!",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم — שלום עולם",
    "Emoji: 😀😃😄😁 🎉🎊 👍🏽 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍🚀",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    '{"name": "rwkv", "version": [0, 8, 32], "ok": true, "nested": {"a": null}}',
    "<html><body><div class=\"x\">&amp; &lt;tag&gt;</div></body></html>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "mixed   whitespace\t\ttabs\n\n\nnewlines \r\n crlf \u3000ideographic\u00a0nbsp \u2028 line sep",
    "    leading spaces and trailing spaces    ",
    "\n\n\n\n",
    "\t",
    " ",
    "a",
    "User: Hello!\n\nAssistant: Hi, how can I help you today?\n\nUser: Tell me a joke.\n\nAssistant:",
    "Ça va? Où est la bibliothèque? Größe, Straße, naïve café, coöperate, Åland, ñandú",
    "Combining: e\u0301 a\u0308 o\u0302 n\u0303 — Zalgo: Z\u0351\u036b\u0343a\u0352l\u0357g\u0352o\u0310",
    "Math: ∀x ∈ ℝ, ∃y: x² + y² ≤ 1 ⇒ ∑ᵢ aᵢ ≠ ∞; ∫₀¹ f(x) dx ≈ π/4",
    "Rare planes: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕋𝕖𝕩𝕥 𠜎𠜱𠝹𠱓 𓀀𓀁 \U0010FFFD",
    "Controls: \x00\x01\x02\x07\x08\x1b[31mred\x1b[0m\x7f",
    "#" * 200,
    "-" * 100 + "=" * 100,
    " " * 300,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "https://github.com/BlinkDL/RWKV-LM/blob/main/RWKV-v7/rwkv_v7_demo.py?x=1&y=2#L10",
    "混合English和中文text以及日本語のtext🙂 plus code `x = 1` ！？。",
]


def random_unicode(rng, n):
    """A string of n code points drawn from varied blocks (no surrogates)."""
    blocks = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1FAFF), (0x10000, 0x1007F), (0xE000, 0xF8FF), (0x20000, 0x2A6DF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def build_texts():
    rng = random.Random(20230424)
    texts = list(FIXED)
    texts += [random_unicode(rng, rng.randint(1, 200)) for _ in range(60)]
    # Words glued from the vocabulary's own pieces stress longest-match boundaries.
    pieces = ["the", " the", "ing", " ", "  ", "\n", "中", "国", "人", "😀", "ab", "abc", "##", "--"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(5, 80))) for _ in range(40)]
    shared = os.environ.get("RWKVCPU_SHARED", str(HERE.parent.parent.parent / "shared"))
    dev = Path(shared) / "corpus" / "dev.txt"
    if dev.exists():
        prose = dev.read_text(encoding="utf-8")
        for start in (0, 250_000, 1_000_000, 1_900_000):
            texts.append(prose[start:start + 5000])
    return texts


def main():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    import rwkv
    vocab = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    ref = TRIE_TOKENIZER(str(vocab))
    texts = build_texts()
    golden = {"source": "rwkv 0.8.32 TRIE_TOKENIZER, rwkv_vocab_v20230424.txt",
              "texts": texts, "ids": [ref.encode(t) for t in texts]}
    OUT.write_text(json.dumps(golden, ensure_ascii=True, indent=None) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(texts)} texts, {sum(map(len, golden['ids']))} tokens")


if __name__ == "__main__":
    main()
