"""Structured output: generation held to a JSON Schema, any JSON object, a regular
expression, a choice among strings or a context-free grammar (Lark or GBNF).

The constraint engine is llguidance (the one llama.cpp and vLLM use), an extra:
``pip install 'rwkvcpu[structured]'``. A constraint is compiled once per request
(`make_constraint`, which checks it before anything is generated) and gives each
sequence its own `ConstraintState`, advanced by one token per step. Before a
token is sampled, `ConstraintState.mask` sets the logits of every token that
would leave the constraint to -inf, so only tokens that keep the output inside
it can be drawn; the generation ends when the constraint is complete (nothing
more can follow) or when the model picks end-of-text where the output may end.

A batch holds one ConstraintState per constrained sequence and masks that
sequence's row of the logits: the states share nothing but the compiled grammar.

Example:
    >>> from rwkvcpu.structured import make_constraint
    >>> c = make_constraint(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    >>> state = c.start(model.tokenizer, model.config.vocab_size)
    >>> logits, s = model.forward(model.tokenizer.encode("Answer in JSON: "))
    >>> while not state.done:
    ...     state.mask(logits)                       # forbidden tokens -> -inf, in place
    ...     token = int(logits.argmax())
    ...     if token == state.eos_token:
    ...         break
    ...     state.advance(token)
    ...     logits, s = model.forward([token], s)
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ExtraNotInstalledError, InvalidArgumentError

INSTALL_HINT = "pip install 'rwkvcpu[structured]'"

# JSON output: one space after ':' and ',' and no other whitespace, as Python's
# json.dumps writes it. Free whitespace would let a model (a random one above
# all) spend its token budget on blanks; a schema's own "x-guidance" key may
# still ask for other separators.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

KINDS = ("json_schema", "json_object", "regex", "grammar", "choices")

JsonSchema = Union[Mapping[str, Any], str]


def llguidance():
    """The llguidance module, or ExtraNotInstalledError saying how to install it."""
    try:
        import llguidance as llg
    except ImportError:
        raise ExtraNotInstalledError(
            f"structured output (JSON schema, regex, grammar, choices) needs llguidance: {INSTALL_HINT}") from None
    return llg


def _one_line(message: str, where: bool = True) -> str:
    """llguidance's (multi-line) error message as one line.

    Regex errors carry the regex crate's "error: ..." line, which says it
    best; grammar errors start with "at LINE(COLUMN): what", followed by the
    source line and a caret, which are dropped.
    """
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    first = lines[0] if lines else "invalid"
    m = re.match(r"at (\d+)\((\d+)\):\s*(.*)", first)
    if m:
        return f"line {m[1]}, column {m[2]}: {m[3]}" if where else m[3]
    return first


class Constraint:
    """What the whole generated text must be, compiled once per request.

    Made by `make_constraint`. Immutable once made: one Constraint can serve
    any number of sequences and threads, each through its own `start()`.

    Attributes:
        kind: "json_schema", "json_object", "regex", "grammar" or "choices".
        grammar: llguidance's grammar (JSON text) compiled from the request.
    """

    def __init__(self, kind: str, grammar: str):
        self.kind = kind
        self.grammar = grammar
        self._lock = threading.Lock()
        # id(engine tokenizer) -> (it, compiled matcher in its initial state), deep-copied by start()
        self._compiled = {}

    def start(self, tokenizer, vocab_size: int) -> "ConstraintState":
        """A fresh state of this constraint for one sequence of a model.

        Args:
            tokenizer: the model's tokenizer (World, Hugging Face or bytes).
            vocab_size: the model's number of logits (may exceed the tokenizer's tokens).

        Raises:
            InvalidArgumentError: the constraint cannot be compiled for this tokenizer.
        """
        llg = llguidance()
        tok = engine_tokenizer(tokenizer, vocab_size)
        with self._lock:
            compiled = self._compiled.get(id(tok), (None, None))[1]
            if compiled is None:
                compiled = llg.LLMatcher(tok, self.grammar, log_level=0)
                if compiled.is_error():
                    raise InvalidArgumentError(f"the {_WHAT[self.kind]} cannot be used: "
                                               f"{_one_line(compiled.get_error(), self.kind != 'regex')}")
                self._compiled[id(tok)] = (tok, compiled)
            matcher = compiled.deep_copy()
        return ConstraintState(matcher, tok, vocab_size)

    def __repr__(self):
        return f"<Constraint {self.kind}>"


class ConstraintState:
    """One sequence's progress through a Constraint: which tokens may come next.

    Attributes:
        eos_token: the end-of-text token the constraint allows where the text
            may end (when the model has none, an id past its logits, never drawn).
        bitmask: (ceil(n / 32),) int32, the last mask (bit t: token t allowed).
    """

    def __init__(self, matcher, tok, vocab_size: int):
        self._matcher = matcher
        self.eos_token = tok.eos_token
        self.vocab_size = vocab_size
        self.bitmask = np.full((tok.vocab_size + 31) // 32, -1, np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Set the logits of the tokens the constraint forbids next to -inf, in place.

        Args:
            logits: (vocab_size,) float32 or float64, e.g. one row of a batch's logits.

        Returns:
            logits.

        Raises:
            InvalidArgumentError: the constraint reached a state it cannot
                leave (a grammar that needs a token the model lacks).
        """
        from .kernels.sampling import mask_logits
        m = self._matcher
        m.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        if m.is_error():
            raise InvalidArgumentError(f"the constraint cannot go on: {_one_line(m.get_error())}")
        mask_logits(logits, self.bitmask)
        return logits

    def allowed(self, token: int) -> bool:
        """Whether the last mask allowed `token`."""
        return bool((int(self.bitmask[token >> 5]) >> (token & 31)) & 1)

    def advance(self, token: int) -> None:
        """Take a generated token (one the mask allowed).

        Raises:
            InvalidArgumentError: the token leaves the constraint.
        """
        if not self._matcher.consume_token(int(token)):
            raise InvalidArgumentError(f"token {token} does not fit the constraint: "
                                       f"{_one_line(self._matcher.get_error())}")

    @property
    def done(self) -> bool:
        """The constraint is complete and nothing more can follow."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far satisfies the constraint (it may end here)."""
        return self._matcher.is_accepting()


_WHAT = {"json_schema": "JSON schema", "json_object": "JSON object constraint", "regex": "regular expression",
         "grammar": "grammar", "choices": "choices"}


def _checked(kind: str, grammar_of, source) -> Constraint:
    """Compile `source` with grammar_of and check it; InvalidArgumentError naming the problem."""
    llg = llguidance()
    what = _WHAT[kind]
    try:
        grammar = grammar_of(source)
    except ValueError as e:
        raise InvalidArgumentError(f"bad {what}: {_one_line(str(e))}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidArgumentError(f"bad {what}: {_one_line(messages[0], kind != 'regex')}")
    return Constraint(kind, grammar)


def _schema_object(json_schema: JsonSchema) -> dict:
    if isinstance(json_schema, (bytes, bytearray)):
        json_schema = json_schema.decode("utf-8", "replace")
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"the JSON schema is not valid JSON ({e})") from None
    if isinstance(json_schema, bool):
        json_schema = {} if json_schema else {"not": {}}
    if not isinstance(json_schema, Mapping):
        raise InvalidArgumentError(f"a JSON schema must be a JSON object, got {type(json_schema).__name__}")
    return dict(json_schema)


def make_constraint(*, json_schema: Optional[JsonSchema] = None, json_object: bool = False,
                    regex: Optional[str] = None, grammar: Optional[str] = None,
                    choices: Optional[Sequence[str]] = None) -> Optional[Constraint]:
    """Compile and check the constraint of one request (at most one may be given).

    Args:
        json_schema: a JSON Schema (a dict, or its JSON text): objects,
            properties, required, additionalProperties, arrays (items,
            prefixItems, minItems, maxItems), enum, const, strings (minLength,
            maxLength, pattern, format), numbers and integers (minimum,
            maximum, exclusive bounds, multipleOf), anyOf, $ref / $defs,
            nesting. Object properties come in the schema's order.
        json_object: any JSON object.
        regex: a regular expression the whole output must match (Rust regex
            syntax: no look-around or back-references).
        grammar: a context-free grammar in Lark syntax (``start: ...``) or
            GBNF (llama.cpp's, ``root ::= ...``).
        choices: the output is exactly one of these strings.

    Returns:
        a Constraint, or None when no constraint is given.

    Raises:
        InvalidArgumentError: more than one constraint, an invalid schema or
            grammar, an unsupported schema keyword, a bad regular expression.
        ExtraNotInstalledError: llguidance is not installed.

    Example:
        >>> make_constraint(regex=r"\\d{3}-\\d{4}")
        <Constraint regex>
        >>> make_constraint(json_schema={"type": "strin"})
        Traceback (most recent call last):
        rwkvcpu.errors.InvalidArgumentError: bad JSON schema: Invalid type: strin
    """
    given = [k for k, v in (("json_schema", json_schema), ("json_object", json_object or None),
                            ("regex", regex), ("grammar", grammar), ("choices", choices)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidArgumentError(f"give one constraint at most, got {' and '.join(given)}")
    llg = llguidance()
    kind = given[0]
    if kind == "json_object":
        return _checked(kind, lambda s: llg.LLMatcher.grammar_from_json_schema(s, defaults=JSON_FORMAT),
                        {"type": "object"})
    if kind == "json_schema":
        return _checked(kind, lambda s: llg.LLMatcher.grammar_from_json_schema(s, defaults=JSON_FORMAT),
                        _schema_object(json_schema))
    if kind == "regex":
        if not isinstance(regex, str):
            raise InvalidArgumentError(f"the regular expression must be a string, got {regex!r}")
        return _checked(kind, lambda s: llg.grammar_from("regex", s), regex)
    if kind == "grammar":
        if not isinstance(grammar, str) or not grammar.strip():
            raise InvalidArgumentError("the grammar must be the non-empty text of a Lark or GBNF grammar")
        return _checked(kind, lambda s: llg.grammar_from("grammar", s), grammar)
    if isinstance(choices, (str, bytes)) or not all(isinstance(c, str) for c in choices):
        raise InvalidArgumentError(f"choices must be a list of strings, got {choices!r}")
    if not choices:
        raise InvalidArgumentError("choices is empty: give at least one string")
    return _checked(kind, lambda s: llg.grammar_from("choice", s), list(choices))


# ---------------------------------------------------------------------------
# Our tokenizers as llguidance sees them

_ENGINE_TOKENIZERS = weakref.WeakKeyDictionary()   # our tokenizer -> {vocab_size: LLTokenizer}
_ENGINE_LOCK = threading.Lock()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, end-of-text, and encoding."""

    def __init__(self, tokenizer, n: int, eos: int):
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (n - len(self.tokens))
        self.eos_token_id = eos
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, data: bytes) -> list[int]:
        t = self._tokenizer
        if hasattr(t, "encode_bytes"):
            return t.encode_bytes(data)
        if t.name == "bytes":
            return list(data)
        return t.encode(data.decode("utf-8", "replace"))


def engine_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of one of our tokenizers for a model of `vocab_size` logits, built once.

    World, bytes and byte-level Hugging Face vocabularies hand over each
    token's exact bytes; other Hugging Face tokenizers (sentencepiece style)
    are read by llguidance from their tokenizer.json. A vocabulary without an
    end-of-text token gets one past the model's logits, which the sampler
    never draws: such a model's output ends when the constraint is done.

    Raises:
        InvalidArgumentError: llguidance cannot read this tokenizer.
    """
    llg = llguidance()
    with _ENGINE_LOCK:
        per_vocab = _ENGINE_TOKENIZERS.setdefault(tokenizer, {})
        tok = per_vocab.get(vocab_size)
        if tok is not None:
            return tok
        eos = tokenizer.eos_token_id
        n = max(vocab_size, tokenizer.vocab_size)
        if eos is None:
            eos, n = n, n + 1
        json_text = getattr(tokenizer, "tokenizer_json", None)
        try:
            if json_text is not None and not tokenizer.byte_level:
                tok = llg.LLTokenizer(json_text, n_vocab=n, eos_token=eos)
            else:
                tok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer, n, eos)), n_vocab=n)
        except Exception as e:  # the Rust side raises plain ValueErrors and the like
            raise InvalidArgumentError(
                f"structured output cannot use the {tokenizer.name} tokenizer: llguidance cannot read it "
                f"({_one_line(str(e))})") from None
        per_vocab[vocab_size] = tok
        return tok
