"""rwkvcpu.load(..., tokenizer=...), and a model loaded without a tokenizer."""

import numpy as np
import pytest

import rwkvcpu
from checkpoints import random_official_state_dict, write_pth
from reference import official
from rwkvcpu.errors import InvalidArgumentError
from test_convert_bad_input import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def odd_vocab_pth(tmp_path_factory):
    """An official .pth whose 1000-token vocabulary matches no built-in tokenizer."""
    path = tmp_path_factory.mktemp("tok") / "odd-vocab.pth"
    write_pth(path, random_official_state_dict("v7", n_layer=1, n_embd=64, vocab_size=1000, head_size=32, seed=3))
    return path


def word_tokenizer_json(tmp_path, n):
    """A Hugging Face tokenizer.json of n tokens w0 .. w{n-1}, split at spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / f"words-{n}.json"
    path.write_text(tok.to_str(), encoding="utf-8")
    return path


def test_a_model_without_tokenizer_runs_token_ids(odd_vocab_pth):
    model = rwkvcpu.load(odd_vocab_pth)
    assert model.info["tokenizer"] == "none"
    logits, state = model.forward([1, 999, 5])
    assert logits.shape == (1000,) and np.isfinite(logits).all()
    pool = model.state_pool(1)
    np.testing.assert_array_equal(model.step(pool, [(pool.acquire(), [1, 999, 5])])[0], logits)
    for call in (lambda: model.tokenizer, lambda: model.complete("hi", max_tokens=2),
                 lambda: model.chat_session().send("hi")):
        with pytest.raises(InvalidArgumentError, match=r"this model has no tokenizer .*tokenizer=NAME"):
            call()


def test_generate_without_tokenizer_is_one_line(odd_vocab_pth, capsys):
    code, _, err = run_cli(["generate", "-m", odd_vocab_pth, "-n", "2", "hi"], capsys)
    assert_one_line_error(code, err, "this model has no tokenizer", "vocabulary of 1000 tokens",
                          "rwkvcpu.load(path, tokenizer=NAME)", "rwkvcpu convert --tokenizer")


def test_load_converts_with_the_tokenizer_given(odd_vocab_pth, tmp_path):
    model = rwkvcpu.load(odd_vocab_pth, tokenizer=word_tokenizer_json(tmp_path, 1000))
    assert model.info["tokenizer"] == "embedded"
    assert model.tokenizer.encode("w7 w999") == [7, 999]
    logits, _ = model.forward([7, 999])
    text = model.complete("w7 w999", max_tokens=3, temperature=0)
    assert text.split()[0] == f"w{int(logits.argmax())}"
    assert rwkvcpu.load(odd_vocab_pth, tokenizer="bytes").tokenizer.encode("A") == [65]


def test_load_replaces_a_files_tokenizer(tmp_path):
    sd = official.random_official("v7", n_layer=1, n_embd=64, vocab_size=256, head_size=32, seed=1)
    config, tensors = official.canonical_from_official("v7", sd, tokenizer="bytes")
    path = official.write_model(tmp_path / "m.safetensors", config, tensors)
    assert rwkvcpu.load(path).tokenizer.encode("A") == [65]
    model = rwkvcpu.load(path, tokenizer=word_tokenizer_json(tmp_path, 256))
    assert model.info["tokenizer"] == "embedded"
    assert model.tokenizer.encode("w65 w3") == [65, 3]
    # the same weights: the tokenizer changes nothing else
    np.testing.assert_array_equal(model.forward([3, 4])[0], rwkvcpu.load(path).forward([3, 4])[0])


@pytest.mark.parametrize("tokenizer, match", [
    ("world", "the tokenizer world has 65536 tokens but the model only 256 logits; pass a tokenizer of at most 256"),
    ("no-such.json", "neither world, neox-20b, bytes nor an existing tokenizer.json"),
])
def test_load_refuses_a_tokenizer_that_cannot_serve(tmp_path, tokenizer, match):
    sd = official.random_official("v7", n_layer=1, n_embd=64, vocab_size=256, head_size=32, seed=1)
    config, tensors = official.canonical_from_official("v7", sd, tokenizer="bytes")
    path = official.write_model(tmp_path / "m.safetensors", config, tensors)
    with pytest.raises(InvalidArgumentError, match=match):
        rwkvcpu.load(path, tokenizer=tokenizer)
