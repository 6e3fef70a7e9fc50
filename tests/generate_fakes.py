"""A fake Model honouring the engine's contract, for generation and chat tests.

It "knows" one script of bytes and predicts its next byte: after feeding
tokens that follow the script, the logits peak at the script's next byte; any
other token sends it back to the script's start. Deterministic, instant, and
byte-level by default (tokenizer "bytes", vocabulary 256; "world" on
request), so tests can reason about exactly what a sampler should produce.

Also the fixture tiny_v7_file: a real tiny model converted once per session.
"""

import threading

import numpy as np
import pytest

from rwkvcpu.config import ModelConfig
from rwkvcpu.state import State
from rwkvcpu.tokenizers import load_tokenizer

# Sections of the fake's state array (its first floats)
POS, FED, LAST = 0, 1, 2


class FakeModel:
    """forward(tokens, state=None, *, all_logits=False) -> (logits, new state), like rwkvcpu.Model.

    Args:
        script: the text the model predicts, cyclically (as tokens of its tokenizer).
        peak: how much the script's next token stands above the others.
        tokenizer: "bytes" (vocabulary 256) or "world" (65536).
        end_of_text: the script ends with the end-of-text token.
    """

    def __init__(self, script="Once upon a time.\n\n", peak=None, tokenizer="bytes", end_of_text=False):
        vocab = 65536 if tokenizer == "world" else 256
        self.config = ModelConfig("v7", n_layer=1, n_embd=16, vocab_size=vocab, dim_ffn=16,
                                  head_size=16, tokenizer=tokenizer)
        self.metadata = dict(self.config.to_metadata(), format="rwkvcpu", format_version="1")
        self.fingerprint = "fake" + script.encode().hex()[:60]
        self.tokenizer = load_tokenizer(self.metadata)
        tokens = self.tokenizer.encode(script) + ([self.tokenizer.eos_token_id] if end_of_text else [])
        self.script = np.array(tokens, np.int64)
        # the largest of 65536 normal draws is about 4.5: the peak must clear it
        self.peak = peak if peak is not None else (6.0 if vocab == 256 else 12.0)
        self.noise = np.random.default_rng(0).normal(size=(len(self.script), vocab)).astype(np.float32)
        self.fed = []            # every token ever fed, in order (all threads)
        self.calls = 0
        self._lock = threading.Lock()

    def initial_state(self):
        return State.zeros(self.config, self.fingerprint)

    def _logits(self, pos):
        i = int(pos) % len(self.script)
        out = self.noise[i].copy()
        out[self.script[i]] += self.peak
        return out

    def forward(self, tokens, state=None, *, all_logits=False):
        tokens = list(tokens)
        if not tokens:
            raise ValueError("forward needs at least one token")
        new = (state or self.initial_state()).copy()
        d = new.data
        rows = []
        for t in tokens:
            if not 0 <= t < self.config.vocab_size:
                raise ValueError(f"token {t} out of range")
            pos = int(d[POS])
            if t == self.script[pos % len(self.script)]:
                d[POS] = pos + 1
            else:
                d[POS] = 1 if t == self.script[0] else 0
            d[FED] += 1
            d[LAST] = t
            rows.append(self._logits(d[POS]))
        with self._lock:
            self.fed.extend(tokens)
            self.calls += 1
        return (np.stack(rows) if all_logits else rows[-1]), new


@pytest.fixture(scope="session")
def tiny_v7_file(tmp_path_factory):
    """The shared tiny RWKV-7 (byte-level) converted to an fp32 rwkvcpu file, once per session.

    Without ../shared, a random-weight byte-level v7 of the official layout stands
    in: the CLI tests compare the commands with the Python API on the same file,
    so they hold for any weights.
    """
    from conftest import SHARED, tiny_model_path
    from rwkvcpu.quant.convert import convert
    from checkpoints import random_official_state_dict, write_pth
    work = tmp_path_factory.mktemp("tiny")
    if SHARED is not None:
        src = tiny_model_path("v7")
    else:
        src = write_pth(work / "random-v7.pth", random_official_state_dict("v7", 2, 64, 256, head_size=32, seed=5))
    dst = work / "tiny-v7.safetensors"
    convert(src, dst, dtype="fp32", progress=False)
    return dst
