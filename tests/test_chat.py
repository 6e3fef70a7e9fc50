"""ChatSession: the World chat format, the conversation kept in the state, never re-fed."""

import numpy as np
import pytest

from generate_fakes import FakeModel
from rwkvcpu.errors import InvalidArgumentError, StateMismatchError
from rwkvcpu.generate import ChatSession, clean_message

GREEDY = dict(temperature=0, presence_penalty=0, frequency_penalty=0)


def fed_text(m):
    return m.tokenizer.decode(m.fed)


def test_turns_are_fed_in_world_format_and_replies_end_at_a_blank_line():
    m = FakeModel(" Hi there.\n\n")
    chat = ChatSession(m, **GREEDY)
    assert chat.ask("Hello!") == "Hi there."
    assert chat.ask("How are you?") == "Hi there."
    chat.state
    assert fed_text(m) == ("User: Hello!\n\nAssistant: Hi there.\n\n"
                           "User: How are you?\n\nAssistant: Hi there.\n\n")
    assert chat.history == [("Hello!", "Hi there."), ("How are you?", "Hi there.")]


def test_history_is_never_fed_again():
    m = FakeModel(" Hi there.\n\n")
    chat = ChatSession(m, **GREEDY)
    chat.ask("one")
    before = len(m.fed)
    chat.ask("two")
    chat.state
    turn = "User: two\n\nAssistant: Hi there.\n\n"
    assert len(m.fed) - before == len(turn.encode())
    # the state holds the whole conversation: one model call per token, no replay
    assert chat.state.data[1] == len(m.fed)


def test_streamed_reply_has_no_leading_space_and_no_stop_string():
    m = FakeModel(" Hi 日本.\n\n")
    chunks = list(ChatSession(m, **GREEDY).send("x"))
    assert "".join(chunks) == "Hi 日本."
    assert all("\ufffd" not in c for c in chunks)


def test_a_reply_stopped_early_is_closed_with_a_blank_line():
    m = FakeModel(" Hi there friend.\n\n")
    chat = ChatSession(m, **GREEDY)
    reply = chat.send("one")
    assert next(reply) == "H"
    chat.ask("two")             # closes turn one first
    assert fed_text(m).startswith("User: one\n\nAssistant: H\n\nUser: two\n\nAssistant: Hi")
    assert chat.history[0] == ("one", "H")


def test_a_reply_cut_by_max_tokens_is_closed_too():
    m = FakeModel(" Hi there friend.\n\n")
    chat = ChatSession(m, max_tokens=3, **GREEDY)
    assert chat.ask("one") == "Hi"
    chat.state
    assert fed_text(m) == "User: one\n\nAssistant: Hi\n\n"


def test_messages_are_cleaned_for_the_format():
    assert clean_message("  a\r\n\r\nb\n\n\nc  ") == "a\nb\nc"
    with pytest.raises(InvalidArgumentError, match="empty"):
        ChatSession(FakeModel()).send(" \n ")


def test_system_prompt_is_fed_once_and_after_reset():
    m = FakeModel(" ok\n\n")
    chat = ChatSession(m, system="Be brief.", **GREEDY)
    chat.ask("a")
    chat.reset()
    chat.ask("b")
    chat.state
    assert fed_text(m) == ("System: Be brief.\n\nUser: a\n\nAssistant: ok\n\n"
                           "System: Be brief.\n\nUser: b\n\nAssistant: ok\n\n")
    assert chat.history == [("b", "ok")]


def test_reset_forgets_the_conversation():
    m = FakeModel(" ok\n\n")
    chat = ChatSession(m, **GREEDY)
    chat.ask("a")
    chat.reset()
    assert chat.state is None and chat.history == []


def test_save_and_load_continue_the_conversation(tmp_path):
    m = FakeModel(" ok\n\n")
    chat = ChatSession(m, **GREEDY)
    chat.ask("a")
    chat.save(tmp_path / "c.state")
    saved = chat.state.data.copy()
    chat.ask("b")
    other = ChatSession(m, **GREEDY)
    other.load(tmp_path / "c.state")
    np.testing.assert_array_equal(other.state.data, saved)
    with pytest.raises(StateMismatchError):
        ChatSession(FakeModel(" different\n\n")).load(tmp_path / "c.state")


def test_save_before_any_turn(tmp_path):
    m = FakeModel()
    ChatSession(m).save(tmp_path / "empty.state")
    assert (tmp_path / "empty.state").exists()


def test_seeded_conversations_reproduce():
    def talk(seed):
        chat = ChatSession(FakeModel(" Hello there friend.\n\n", peak=2.0), seed=seed, max_tokens=30)
        return [chat.ask("hi"), chat.ask("again")]
    assert talk(5) == talk(5)
    assert talk(5) != talk(6)


def test_extra_stop_strings_are_kept_with_the_blank_line():
    m = FakeModel(" Hi there.\n\n")
    chat = ChatSession(m, stop=["there"], **GREEDY)
    assert chat.ask("x") == "Hi"
    chat.state
    assert fed_text(m).endswith("Assistant: Hi there\n\n")


def test_world_chat_format_tokens():
    m = FakeModel(" 你好！\n\n", tokenizer="world")
    chat = ChatSession(m, **GREEDY)
    assert chat.ask("Hi") == "你好！"
    chat.state
    tok = m.tokenizer
    assert m.fed[:len(tok.encode("User: Hi\n\nAssistant:"))] == tok.encode("User: Hi\n\nAssistant:")
    assert tok.decode(m.fed) == "User: Hi\n\nAssistant: 你好！\n\n"


def test_a_reply_does_not_end_before_its_first_visible_character():
    # a model that starts its reply with a blank line (the turn separator)
    m = FakeModel("\n\n Hi.\n\n")
    chat = ChatSession(m, **GREEDY)
    assert chat.ask("x") == "Hi."
    chat.state
    assert m.tokenizer.decode(m.fed) == "User: x\n\nAssistant:\n\n Hi.\n\n"


def test_a_refused_message_leaves_the_conversation_as_it_was():
    m = FakeModel(" Hi there friend.\n\n")
    chat = ChatSession(m, **GREEDY)
    reply = chat.send("one")
    assert next(reply) == "H"                     # turn one still open, its token not yet fed
    fed = list(m.fed)
    # a lone surrogate is no character: every tokenizer refuses it, at its place in the message
    with pytest.raises(InvalidArgumentError, match="U\\+D800 at character 2"):
        chat.send("ab\ud800")
    assert m.fed == fed and chat.history == []     # nothing fed, turn one not even closed
    assert chat.ask("two") == "Hi there friend."
    assert fed_text(m) == "User: one\n\nAssistant: H\n\nUser: two\n\nAssistant: Hi there friend.\n\n"
    assert chat.history == [("one", "H"), ("two", "Hi there friend.")]


@pytest.mark.parametrize("interrupted_call", [1, 2])
def test_ctrl_c_while_closing_a_turn_loses_nothing(interrupted_call):
    """Closing turn one feeds its last token (call 1), then the blank line (call 2);
    a Ctrl-C in either leaves the turn to be closed by the next message."""
    m = FakeModel(" Hi there friend.\n\n")
    chat = ChatSession(m, **GREEDY)
    reply = chat.send("one")
    assert next(reply) == "H"
    forward, calls = m.forward, {"n": 0}

    def ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupted_call:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    m.forward = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        chat.send("two")
    m.forward = forward
    assert chat.ask("two") == "Hi there friend."
    state = chat.state
    assert fed_text(m) == "User: one\n\nAssistant: H\n\nUser: two\n\nAssistant: Hi there friend.\n\n"
    assert state.data[1] == len(m.fed)             # the state holds every token fed, once
    assert chat.history == [("one", "H"), ("two", "Hi there friend.")]
