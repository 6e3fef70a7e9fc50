"""Structured output (rwkvcpu/structured.py): every output fits its constraint.

JSON outputs parse and validate with `jsonschema`, regex outputs fullmatch with
Python's `re`, grammar outputs parse with `lark` -- checkers independent of the
engine that constrained them -- on the trained shipped model and on small
models with random weights, sampled at temperature 1 with nothing filtered
(top_p 1): a random model goes wherever the mask lets it, so it finds what a
trained one would rarely try.
"""

import json
import re
import sys
from decimal import Decimal, localcontext

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema", reason="the test extra brings jsonschema: pip install -e '.[test]'")
lark = pytest.importorskip("lark", reason="the test extra brings lark: pip install -e '.[test]'")
pytest.importorskip("llguidance", reason="structured output needs llguidance: pip install -e '.[test]'")

import rwkvcpu  # noqa: E402
from checkpoints import random_official_state_dict  # noqa: E402
from generate_fakes import FakeModel, tiny_v7_file  # noqa: E402,F401 (fixture)
from reference import official  # noqa: E402
from rwkvcpu.errors import ExtraNotInstalledError, InvalidArgumentError  # noqa: E402
from rwkvcpu.models import default_model_path  # noqa: E402
from rwkvcpu.structured import make_constraint  # noqa: E402
from structured_schemas import REAL_WORLD, random_schemas  # noqa: E402

FREE = dict(temperature=1.0, top_p=1.0)        # temperature 1, every token a candidate
DONE = ("constraint", "stop_token")


def random_model(tmp_path_factory, tokenizer, vocab, seed):
    sd = random_official_state_dict("v7", 1, 32, vocab, head_size=16, seed=seed)
    config, tensors = official.canonical_from_official("v7", sd, tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("structured") / f"random-{tokenizer}.safetensors"
    return rwkvcpu.load(official.write_model(path, config, tensors))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random-weight RWKV-7 with the World vocabulary (65536 byte-string tokens, end-of-text 0)."""
    return random_model(tmp_path_factory, "world", 65536, seed=3)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A random-weight RWKV-7 with the byte vocabulary (256 tokens, no end-of-text)."""
    return random_model(tmp_path_factory, "bytes", 256, seed=4)


@pytest.fixture(scope="module")
def shipped():
    """The trained model shipped in the package (an embedded byte-level Hugging Face tokenizer)."""
    return rwkvcpu.load(default_model_path())


def run(model, prompt, max_tokens, seed, **constraint):
    g = model.generate(prompt, max_tokens=max_tokens, seed=seed, **FREE, **constraint)
    text = "".join(g)
    assert g.finish_reason in DONE, f"{g.finish_reason} after {len(g.tokens)} tokens: {text[:200]!r}"
    return text


# ------------------------------------------------------------------ JSON schema

RANDOM = random_schemas(40, seed=0)


def check_json(text, schema):
    """json.loads and jsonschema.validate, numbers read as decimals on both sides.

    JSON Schema's multipleOf is decimal: -804.4 is a multiple of 0.1, which binary floats deny.
    """
    decimal = dict(parse_float=Decimal)
    with localcontext(prec=400):
        jsonschema.validate(json.loads(text, **decimal), json.loads(json.dumps(schema), **decimal))


@pytest.mark.parametrize("model_name, count", [("world", 25), ("byte_model", 40)])
def test_random_schemas_on_random_weights(model_name, count, request):
    model = request.getfixturevalue(model_name)
    for i, schema in enumerate(RANDOM[:count]):
        check_json(run(model, "{", 2000, i, json_schema=schema), schema)


# A trained model's strings end where its text would: these keep their free strings.
ON_SHIPPED = ("weather", "sentiment", "search_call")


@pytest.mark.parametrize("name", ON_SHIPPED)
def test_real_world_schemas_on_the_shipped_model(name, shipped):
    schema = REAL_WORLD[name]
    prompt = f"The {name.replace('_', ' ')}, as JSON:\n"
    check_json(run(shipped, prompt, 600, 7, json_schema=schema), schema)


def test_real_world_schemas_with_bounded_strings_on_random_weights(world):
    """The hand-written schemas, their free strings given a maxLength, on the random World model."""
    def bound(s):
        if isinstance(s, dict):
            s = {k: bound(v) for k, v in s.items()}
            if s.get("type") == "string" and not {"enum", "pattern", "format", "maxLength"} & set(s):
                s["maxLength"] = 12
        return [bound(v) for v in s] if isinstance(s, list) else s
    for i, schema in enumerate(REAL_WORLD.values()):
        if "email" not in json.dumps(schema):
            schema = bound(schema)
            check_json(run(world, "{", 2000, i, json_schema=schema), schema)


def test_schema_as_json_text_and_any_object(world, byte_model):
    schema = REAL_WORLD["sentiment"]
    check_json(run(world, "Review:", 300, 1, json_schema=json.dumps(schema)), schema)
    for seed in range(4):
        # any object: free keys, strings and nesting, which a random byte model keeps short enough
        obj = json.loads(run(byte_model, "{", 20000, seed, json_object=True))
        assert isinstance(obj, dict)


def test_json_output_is_compact_and_ends_with_the_object(shipped):
    g = shipped.generate("Sentiment:", json_schema=REAL_WORLD["sentiment"], seed=2, **FREE)
    text = "".join(g)
    assert g.finish_reason == "constraint" and text.endswith("}")
    assert text == json.dumps(json.loads(text), ensure_ascii=False)


# ----------------------------------------------------------------------- regex

# Rust's regex syntax and Python's agree on these; both read \d as any Unicode digit, but
# of different Unicode versions, so digits are spelled [0-9].
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", r"#[0-9a-fA-F]{6}",
           r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}", r"(yes|no|maybe)", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)",
           r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",
           r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?", r"(ab|cd)*e", r"[^ \t\n\"]{2,6}", r"[αβγ日本]{1,4}!",
           r"x{0,3}y?z{2}"]


@pytest.mark.parametrize("model_name, count", [("world", 12), ("byte_model", 12), ("shipped", 5)])
def test_regex_outputs_fullmatch(model_name, count, request):
    model = request.getfixturevalue(model_name)
    for i, pattern in enumerate(REGEXES[:count]):
        text = run(model, "Answer:", 400, i, regex=pattern)
        assert re.fullmatch(pattern, text), (pattern, text)


def test_choices(world, byte_model, shipped):
    cases = [["red", "green", "blue"], ["a", "ab", "abc"], ['say "hi"', "naïve", "日本", "tab\there"], ["only"]]
    for model in (world, byte_model, shipped):
        for i, choices in enumerate(cases):
            for seed in range(3):
                assert run(model, "Pick:", 50, 10 * i + seed, choices=choices) in choices


# --------------------------------------------------------------------- grammars

# Lark grammars in the syntax both llguidance and the lark package read.
LARK = {
    "arithmetic": r'''
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,4}/
''',
    "list": r'''
start: "[" item ("," item)* "]"
item: WORD | "[" item ("," item)* "]"
WORD: /[a-z]{1,6}/
''',
    "key_values": r'''
start: pair (";" pair)*
pair: KEY "=" VALUE
KEY: /[a-z_]{1,8}/
VALUE: /[0-9]{1,3}/ | "true" | "false"
''',
}

# GBNF grammars (llama.cpp) and the same language written for lark, which checks the output.
GBNF = {
    "date_list": ('root ::= date (", " date)*\ndate ::= [0-9] [0-9] [0-9] [0-9] "-" [0-1] [0-9]\n',
                  'start: DATE (", " DATE)*\nDATE: /[0-9]{4}-[0-1][0-9]/\n'),
    "greeting": ('root ::= greet " " name "!"\ngreet ::= "Hello" | "Hi" | "Dear"\nname ::= [A-Z] [a-z]{1,8}\n',
                 'start: GREET " " NAME "!"\nGREET: "Hello" | "Hi" | "Dear"\nNAME: /[A-Z][a-z]{1,8}/\n'),
    "parens": ('root ::= "(" inner ")"\ninner ::= ("(" inner ")")* | "x"\n',
               'start: "(" inner ")"\ninner: ("(" inner ")")* | "x"\n'),
}


# Languages where no sentence is the prefix of another: a model without end-of-text
# (the byte vocabulary) ends there, while the others would go on to max_tokens.
SELF_ENDING = {"list", "parens", "greeting"}


def parses(grammar, text):
    lark.Lark(grammar, start="start", parser="earley").parse(text)


@pytest.mark.parametrize("model_name", ["world", "byte_model"])
def test_lark_grammar_outputs_parse(model_name, request):
    model = request.getfixturevalue(model_name)
    for i, (name, grammar) in enumerate(LARK.items()):
        if model.tokenizer.eos_token_id is None and name not in SELF_ENDING:
            continue
        for seed in range(2):
            parses(grammar, run(model, "Output:", 1000, 2 * i + seed, grammar=grammar))


@pytest.mark.parametrize("model_name", ["world", "byte_model"])
def test_gbnf_grammar_outputs_parse(model_name, request):
    model = request.getfixturevalue(model_name)
    for i, (name, (gbnf, same)) in enumerate(GBNF.items()):
        if model.tokenizer.eos_token_id is None and name not in SELF_ENDING:
            continue
        for seed in range(2):
            parses(same, run(model, "Output:", 1000, 2 * i + seed, grammar=gbnf))


def test_byte_model_ends_when_the_grammar_is_done(byte_model):
    """Without an end-of-text token, a generation ends where nothing more can follow."""
    grammar = LARK["list"]
    for seed in range(3):
        g = byte_model.generate("x", grammar=grammar, seed=seed, max_tokens=2000, **FREE)
        text = "".join(g)
        assert g.finish_reason == "constraint"
        parses(grammar, text)


# --------------------------------------------------------------- bad constraints

BAD = [
    (dict(json_schema={"type": "strin"}), "bad JSON schema: Invalid type: strin"),
    (dict(json_schema={"type": "array", "uniqueItems": True}), 'Unimplemented keys: ["uniqueItems"]'),
    (dict(json_schema={"type": "string", "format": "bogus"}), "Unknown format: bogus"),
    (dict(json_schema='{"type": '), "the JSON schema is not valid JSON"),
    (dict(json_schema=[1, 2]), "a JSON schema must be a JSON object, got list"),
    (dict(json_schema={"$ref": "#/$defs/nope"}), "bad JSON schema"),
    (dict(regex="(?=a)b"), "bad regular expression: look-around, including look-ahead and look-behind, is not supported"),
    (dict(regex="a("), "bad regular expression: unclosed group"),
    (dict(regex=5), "the regular expression must be a string"),
    (dict(grammar="start: foo"), 'bad grammar: line 1, column 8: unknown name: "foo"'),
    (dict(grammar='root ::= "a" | b'), "bad grammar: Failed to convert the grammar from GBNF to Lark: Rule 'b' not found"),
    (dict(grammar="   "), "the grammar must be the non-empty text"),
    (dict(choices=[]), "choices is empty"),
    (dict(choices="yes"), "choices must be a list of strings"),
    (dict(choices=["a", 1]), "choices must be a list of strings"),
    (dict(regex="a", choices=["a"]), "give one constraint at most, got regex and choices"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_constraints_are_refused_before_any_token(kwargs, message):
    fake = FakeModel(tokenizer="world")
    with pytest.raises(InvalidArgumentError) as e:
        fake_generate(fake, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert fake.calls == 0


def fake_generate(model, **kwargs):
    from rwkvcpu.generate import generate
    return generate(model, "x", **kwargs)


def test_missing_llguidance_says_how_to_install(monkeypatch, tiny_v7_file, capsys):
    monkeypatch.setitem(sys.modules, "llguidance", None)      # import llguidance now fails
    with pytest.raises(ExtraNotInstalledError, match=r"pip install 'rwkvcpu\[structured\]'"):
        fake_generate(FakeModel(), regex="a")
    fake_generate(FakeModel())                                 # unconstrained generation needs nothing
    from rwkvcpu.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", str(tiny_v7_file), "--regex", "a+", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'rwkvcpu[structured]'" in err


# ------------------------------------------------------ batches and tokenizers

def test_each_sequence_of_a_batch_follows_its_own_constraint(world):
    """Two sequences step together through Model.step, each row masked by its own state;
    greedy decoding gives what each gives alone through generate."""
    schema = REAL_WORLD["sentiment"]
    constraints = [make_constraint(json_schema=schema), make_constraint(regex=r"[a-z]{2,5}( [a-z]{2,5}){1,3}")]
    prompts = ["Review:", "Words:"]
    alone = [world.complete(p, constraint=c, temperature=0, presence_penalty=0, frequency_penalty=0,
                            max_tokens=400) for p, c in zip(prompts, constraints)]
    tok = world.tokenizer
    pool = world.state_pool(2)
    slots = [pool.acquire(), pool.acquire()]
    states = [c.start(tok, world.config.vocab_size) for c in constraints]
    logits = world.step(pool, [(s, tok.encode(p)) for s, p in zip(slots, prompts)])
    out, live = [[], []], [0, 1]
    for _ in range(400):
        batch = []
        for row, i in enumerate(live):
            states[i].mask(logits[row])
            t = int(np.argmax(logits[row]))
            if t == states[i].eos_token:
                continue
            states[i].advance(t)
            out[i].append(t)
            if not states[i].done:
                batch.append((i, t))
        if not batch:
            break
        live = [i for i, _ in batch]
        logits = world.step(pool, [(slots[i], [t]) for i, t in batch])
    texts = [tok.decode(o) for o in out]
    assert texts == alone
    check_json(texts[0], schema)
    assert re.fullmatch(r"[a-z]{2,5}( [a-z]{2,5}){1,3}", texts[1])


def test_scheduler_gives_each_choice_its_own_constraint(world):
    """Through the server's scheduler: a constrained request with n = 2 and an unconstrained one
    share batches; each choice is valid, choice 0 is what generate gives alone, and a constraint
    refused for the tokenizer fails submit."""
    from rwkvcpu.generate import complete
    from rwkvcpu.sampling import SamplingParams
    from rwkvcpu.scheduler import Finished, Request, Scheduler
    from test_scheduler import drain, events, text_of
    schema = REAL_WORLD["sentiment"]
    json_c, regex_c = make_constraint(json_schema=schema), make_constraint(regex=r"[a-z]{1,6}( [a-z]{1,6}){0,4}")
    params = SamplingParams(seed=5, max_tokens=300, **FREE)
    tok = world.tokenizer
    scheduler = Scheduler(world, max_batch=4)
    requests = [Request(tok.encode("Review:"), params, n=2, constraint=json_c),
                Request(tok.encode("Words:"), params, constraint=regex_c),
                Request(tok.encode("Free:"), params.replace(max_tokens=20))]
    handles = [scheduler.submit(r) for r in requests]
    drain(scheduler, handles)
    evs = [events(h) for h in handles]
    for i in range(2):
        check_json(text_of(evs[0], i), schema)
    assert re.fullmatch(r"[a-z]{1,6}( [a-z]{1,6}){0,4}", text_of(evs[1]))
    assert text_of(evs[0]) == complete(world, "Review:", params, constraint=json_c)
    assert text_of(evs[1]) == complete(world, "Words:", params, constraint=regex_c)
    assert all(e.finish_reason == "stop" for e in evs[0] + evs[1] if isinstance(e, Finished))
    assert scheduler.pool.free == 4
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from rwkvcpu.tokenizers.hf import HFTokenizer
    t = Tokenizer(models.WordLevel({"<unk>": 0, "▁a": 1}, unk_token="<unk>"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    scheduler.tokenizer = HFTokenizer(t.to_str())
    with pytest.raises(InvalidArgumentError, match="cannot use the embedded tokenizer"):
        scheduler.submit(Request([1], params, constraint=regex_c))


def _sentencepiece_json():
    """A Llama-style (sentencepiece, byte fallback) tokenizer.json built with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for w in ["▁", "▁a", "▁b", "ab", "▁ab", "a", "b", "c", "1", "2", "-"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b")], unk_token="<unk>",
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok.to_str()


def test_hugging_face_sentencepiece_tokenizer_is_read_by_the_engine():
    from rwkvcpu.tokenizers.hf import HFTokenizer
    tok = HFTokenizer(_sentencepiece_json())
    assert not tok.byte_level and tok.eos_token_id == 2
    pattern = r"(ab|c){1,4}-[12]{2}"
    c = make_constraint(regex=pattern)
    rng = np.random.default_rng(0)
    for _ in range(5):
        state, out = c.start(tok, tok.vocab_size), []
        while not state.done:
            logits = rng.normal(size=tok.vocab_size).astype(np.float32)
            t = int(np.argmax(state.mask(logits)))
            if t == state.eos_token:
                break
            state.advance(t)
            out.append(t)
        assert re.fullmatch(pattern, tok.decode(out))


def test_tokenizer_the_engine_cannot_read_is_refused_in_one_line():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from rwkvcpu.tokenizers.hf import HFTokenizer
    t = Tokenizer(models.WordLevel({"<unk>": 0, "▁a": 1}, unk_token="<unk>"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    with pytest.raises(InvalidArgumentError, match="structured output cannot use the embedded tokenizer") as e:
        make_constraint(regex="a").start(HFTokenizer(t.to_str()), 2)
    assert "\n" not in str(e.value)


def test_mask_kernel_matches_the_bits():
    from rwkvcpu.kernels.sampling import mask_logits
    rng = np.random.default_rng(1)
    for V in (256, 8192 + 5, 65536):
        words = rng.integers(-2**31, 2**31, size=(V + 31) // 32).astype(np.int32)
        words[::7], words[1::7] = -1, 0
        logits = rng.normal(size=V)
        expect = np.where(np.unpackbits(words.view(np.uint8), bitorder="little")[:V].astype(bool), logits, -np.inf)
        for dtype in (np.float32, np.float64):
            x = logits.astype(dtype)
            mask_logits(x, words)
            np.testing.assert_array_equal(x, expect.astype(dtype))


# ------------------------------------------------------------------ chat and CLI

def test_chat_reply_follows_a_schema(shipped):
    chat = shipped.chat_session(seed=1)
    schema = REAL_WORLD["sentiment"]
    check_json(chat.ask("How do you feel about the sea?", json_schema=schema), schema)
    assert chat.ask("And now in words?", max_tokens=5) is not None     # later turns are free again


def test_cli_constraints(tiny_v7_file, tmp_path, capsys):
    from rwkvcpu.cli.main import main
    schema = REAL_WORLD["sentiment"]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text(LARK["list"])
    (tmp_path / "g.gbnf").write_text(GBNF["parens"][0])
    runs = [(["--json-schema", str(tmp_path / "s.json")], lambda t: check_json(t, schema)),
            (["--regex", r"\d{3}-\d{4}"], lambda t: re.fullmatch(r"\d{3}-\d{4}", t) or pytest.fail(t)),
            (["--grammar", str(tmp_path / "g.lark")], lambda t: parses(LARK["list"], t)),
            (["--grammar", str(tmp_path / "g.gbnf")], lambda t: parses(GBNF["parens"][1], t)),
            (["--choice", "yes", "--choice", "no"], lambda t: t in ("yes", "no") or pytest.fail(t)),
            (["--json"], lambda t: isinstance(json.loads(t), dict) or pytest.fail(t))]
    for flags, check in runs:
        with pytest.raises(SystemExit) as e:
            main(["generate", "-m", str(tiny_v7_file), "-n", "3000", "--seed", "1", "--top-p", "1", *flags, "{"])
        out = capsys.readouterr()
        assert e.value.code == 0, out.err
        check(out.out.rstrip("\n"))


@pytest.mark.parametrize("flags, message", [
    (["--regex", "a(", "x"], "error: bad regular expression: unclosed group"),
    (["--json-schema", "/nonexistent/s.json", "x"], "error: /nonexistent/s.json: no such JSON schema file"),
    (["--regex", "a", "--choice", "a", "x"], "error: give one of --json-schema, --json, --regex, --grammar, --choice"),
])
def test_cli_bad_constraints_exit_2_in_one_line(flags, message, capsys):
    from rwkvcpu.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", "/nonexistent/model.safetensors", *flags])    # refused before the model loads
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1
