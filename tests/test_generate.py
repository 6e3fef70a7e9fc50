"""Streaming generation on a fake model with known predictions, then on a real tiny model."""

import threading

import numpy as np
import pytest

from conftest import SHARED
from generate_fakes import FakeModel, tiny_v7_file  # noqa: F401 (fixture)
from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.generate import StopMatcher, complete, generate

GREEDY = dict(temperature=0, presence_penalty=0, frequency_penalty=0)


def test_greedy_follows_the_model():
    m = FakeModel("Once upon a time.\n\n")
    g = generate(m, "Once", max_tokens=12, **GREEDY)
    chunks = list(g)
    assert "".join(chunks) == " upon a time"
    assert g.text == " upon a time"
    assert g.finish_reason == "length"
    assert len(g.tokens) == 12 and g.stats.generated_tokens == 12
    assert g.stats.prompt_tokens == 4


def test_nothing_runs_until_iterated_and_stopping_early_stops_the_model():
    m = FakeModel()
    g = generate(m, "Once", max_tokens=100, **GREEDY)
    assert m.calls == 0
    for i, _ in enumerate(g):
        if i == 2:
            break
    calls = m.calls
    assert calls == 1 + 2            # the prompt, then one forward per token consumed before the last
    assert m.calls == calls


def test_state_covers_prompt_and_every_generated_token():
    m = FakeModel()
    g = generate(m, "Once", max_tokens=5, **GREEDY)
    next(g)
    state = g.state                   # feeds the token just generated
    assert state.data[1] == 4 + len(g.tokens)
    _, direct = m.forward(m.tokenizer.encode("Once") + g.tokens)
    np.testing.assert_array_equal(state.data, direct.data)


def test_continue_from_a_state():
    m = FakeModel()
    g = generate(m, "Once", max_tokens=5, **GREEDY)
    first = "".join(g)
    more = complete(m, " a", state=g.state, max_tokens=3, **GREEDY)
    assert first == " upon" and more == " ti"


def test_stop_strings_end_the_text_and_are_not_printed():
    m = FakeModel("Once upon a time.\n\n")
    g = generate(m, "Once", max_tokens=50, stop=["a t"], **GREEDY)
    assert "".join(g) == " upon "
    assert g.finish_reason == "stop" and g.stop_string == "a t"


def test_text_that_only_looks_like_a_stop_string_is_released():
    m = FakeModel("Once upon a time.\n\n")
    g = generate(m, "Once", max_tokens=9, stop=["a tx", "on a time"], **GREEDY)
    chunks = list(g)
    assert "".join(chunks) == " upon a t"
    assert g.finish_reason == "length"


def test_stop_tokens():
    m = FakeModel("Once upon a time.\n\n")
    g = generate(m, "Once", max_tokens=50, stop_tokens=[ord("a")], **GREEDY)
    assert "".join(g) == " upon "
    assert g.finish_reason == "stop_token"
    assert ord("a") not in g.tokens


def test_end_of_text_stops_by_default():
    m = FakeModel("Once upon a time.\n\n")
    m.tokenizer.eos_token_id = None
    from rwkvcpu.tokenizers import load_tokenizer
    m.tokenizer = load_tokenizer(dict(m.metadata, eos_token_id=str(ord("."))))
    assert complete(m, "Once", max_tokens=50, **GREEDY) == " upon a time"
    assert complete(m, "Once", max_tokens=14, stop_tokens=[], **GREEDY) == " upon a time.\n"


def test_max_tokens_zero_generates_nothing():
    assert complete(FakeModel(), "Once", max_tokens=0) == ""


def test_multibyte_characters_are_never_split():
    script = "Über 日本 😀 ok\n\n"
    m = FakeModel(script)
    g = generate(m, "Ü", max_tokens=len(script.encode()) - 2, **GREEDY)
    chunks = list(g)
    assert "".join(chunks) == "ber 日本 😀 ok\n\n"
    for c in chunks:
        assert "\ufffd" not in c
    assert "本" in chunks and "😀" in chunks    # whole characters, emitted once complete


def test_world_model_streams_whole_characters_and_stops_at_end_of_text():
    script = "你好，世界！😀 Ünïcödé 東京スカイツリー\n\n"
    m = FakeModel(script, tokenizer="world", end_of_text=True)
    ids = m.tokenizer.encode(script)
    assert any(not _valid_utf8(m.tokenizer.token_bytes(t)) for t in ids)   # some tokens split characters
    g = generate(m, script[:2], max_tokens=100, **GREEDY)
    chunks = list(g)
    assert "".join(chunks) == script[2:]
    assert all("\ufffd" not in c for c in chunks)
    assert g.finish_reason == "stop_token" and 0 not in g.tokens


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_character_cut_by_max_tokens_is_dropped():
    m = FakeModel("a日b")
    assert complete(m, "a", max_tokens=2, **GREEDY) == ""


def test_the_seed_reproduces_and_differs():
    m = FakeModel(peak=1.0)
    a = complete(m, "Once", max_tokens=60, seed=11)
    assert a == complete(m, "Once", max_tokens=60, seed=11)
    assert a != complete(m, "Once", max_tokens=60, seed=12)


def test_prompt_as_token_ids():
    m = FakeModel()
    assert complete(m, list(b"Once"), max_tokens=5, **GREEDY) == " upon"


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"), ([], "prompt is empty"), ([1, 300], "outside"), (b"x", "not bytes")])
def test_bad_prompts(prompt, message):
    with pytest.raises(InvalidArgumentError, match=message):
        generate(FakeModel(), prompt)


def test_bad_options_are_raised_before_anything_runs():
    m = FakeModel()
    with pytest.raises(InvalidArgumentError, match="top_p"):
        generate(m, "x", top_p=2)
    with pytest.raises(InvalidArgumentError, match="unknown sampling option"):
        generate(m, "x", temprature=2)
    with pytest.raises(InvalidArgumentError, match="outside the model's vocabulary"):
        generate(m, "x", banned_tokens=[999])
    assert m.calls == 0


def test_threads_share_one_model_each_with_its_own_state():
    m = FakeModel(peak=1.0)
    seeds = list(range(8))
    expected = {s: complete(m, "Once", max_tokens=40, seed=s) for s in seeds}
    got = {}

    def work(s):
        got[s] = complete(m, "Once", max_tokens=40, seed=s)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert len(set(expected.values())) > 1


def test_stats_count_tokens():
    g = generate(FakeModel(), "Once", max_tokens=7, **GREEDY)
    list(g)
    assert g.stats.prompt_tokens == 4 and g.stats.generated_tokens == 7
    assert g.stats.generation_tokens_per_second > 0
    assert "tokens/s" in g.stats.summary()


def test_stop_matcher_holds_only_possible_prefixes():
    m = StopMatcher(["\n\nUser:"])
    assert m.push("Hi!\n") == ("Hi!", None)
    assert m.push("\nUs") == ("", None)
    assert m.push("x") == ("\n\nUsx", None)
    assert m.push("\n\nUser: hello") == ("", "\n\nUser:")
    m = StopMatcher(["abc", "bd"])
    assert m.push("ab") == ("", None)
    assert m.push("d") == ("a", "bd")
    m = StopMatcher(["xyz"])
    assert m.push("ax") == ("a", None)
    assert m.flush() == "x"


# ------------------------------------------------------------------ real model

@pytest.fixture(scope="module")
def tiny_v7(tiny_v7_file):
    import rwkvcpu
    return rwkvcpu.load(tiny_v7_file)


def incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of data begin a UTF-8 character that is cut short (0 to 3)."""
    for n in (3, 2, 1):
        try:
            data[-n:].decode("utf-8")
        except UnicodeDecodeError as e:
            # a valid start that ran out of bytes, beginning exactly n bytes from the end
            if e.reason == "unexpected end of data" and e.start == 0 and len(data) >= n:
                return n
    return 0


def test_incomplete_utf8_tail():
    assert incomplete_utf8_tail(b"ab") == 0
    assert incomplete_utf8_tail(b"a\xc3") == 1 and incomplete_utf8_tail(b"a\xc3\xa9") == 0
    assert incomplete_utf8_tail(b"\xe2\x82") == 2 and incomplete_utf8_tail(b"\xe2\x82\xac") == 0
    assert incomplete_utf8_tail(b"\xf0\x9f\x98") == 3 and incomplete_utf8_tail(b"\xff") == 0
    assert incomplete_utf8_tail(b"\xe0\x80") == 0 and incomplete_utf8_tail(b"\xc3\xa9\xe2") == 1


def test_real_model_greedy_matches_step_by_step_forward(tiny_v7):
    m = tiny_v7
    g = m.generate("In the", max_tokens=8, **GREEDY)
    text = "".join(g)
    # the same tokens by hand: argmax, feed, repeat
    logits, state = m.forward(m.tokenizer.encode("In the"))
    tokens = []
    for _ in range(8):
        t = int(np.argmax(logits))
        tokens.append(t)
        logits, state = m.forward([t], state)
    assert g.tokens == tokens
    # The text is those tokens' bytes, less a character left incomplete at the end
    # (a random-weight model, without ../shared, generates any bytes).
    raw = m.tokenizer.decode_bytes(tokens)
    assert text == raw[:len(raw) - incomplete_utf8_tail(raw)].decode("utf-8", "replace")
    if SHARED is not None:
        # the trained tiny model continues English text with plain characters
        assert text == m.tokenizer.decode(tokens) and "\ufffd" not in text


def test_real_model_seed_and_threads(tiny_v7):
    m = tiny_v7
    expected = [m.complete("The", max_tokens=6, seed=s) for s in (1, 2)]
    out = [None, None]

    def work(i):
        out[i] = m.complete("The", max_tokens=6, seed=(1, 2)[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == expected


def test_model_methods_call_the_api(tiny_v7):
    m = tiny_v7
    g = m.generate("In the", max_tokens=3, **GREEDY)
    assert "".join(g) == m.complete("In the", max_tokens=3, **GREEDY)
    assert m.chat_session(seed=0) is not None
