"""JSON schemas for the structured-output tests: a generator of random ones within the
supported subset, and hand-written ones of the kinds applications send.

The random schemas bound every string (maxLength, enum, pattern or format), array
(maxItems) and number (minimum/maximum, and multipleOf for the decimals), so that
even a model with random weights, which puts no more weight on a closing quote
than on any other token, finishes its output within a few hundred tokens. The
hand-written schemas are as applications write them, free strings included, and
run on the trained shipped model; their floats bound their decimals with
multipleOf, since JSON Schema has no other way to (a small model can write
digits forever).
"""

import json

import numpy as np

KEYS = ["id", "name", "title", "age", "score", "tags", "items", "kind", "ok", "note", "x", "y",
        "naïve", "日本", "with space", 'q"uote', "back\\slash", "emoji🙂"]
WORDS = ["red", "green", "blue", "a", "ab", "abc", "", "yes", "no", "naïve", "日本語", 'say "hi"', "tab\there",
         "line\nbreak"]
PATTERNS = [r"^[a-z]{1,8}$", r"^\d{3}-\d{4}$", r"^[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6})?$", r"^#[0-9a-f]{6}$",
            r"^(cat|dog|bird)s?$", r"^v\d\.\d{1,2}$"]
FORMATS = ["date", "time", "date-time", "uuid", "ipv4"]


def _string(rng):
    r = rng.random()
    if r < 0.45:
        lo = int(rng.integers(0, 3))
        return {"type": "string", "minLength": lo, "maxLength": lo + int(rng.integers(0, 14))}
    if r < 0.65:
        return {"type": "string", "enum": list(rng.choice(WORDS, int(rng.integers(1, 5)), replace=False))}
    if r < 0.85:
        return {"type": "string", "pattern": str(rng.choice(PATTERNS))}
    return {"type": "string", "format": str(rng.choice(FORMATS))}


def _number(rng):
    lo = int(rng.integers(-1000, 1000))
    hi = lo + int(rng.integers(0, 5000))
    if rng.random() < 0.7:
        s = {"type": "integer", "minimum": lo, "maximum": hi}
        if rng.random() < 0.3:
            s = {"type": "integer", "exclusiveMinimum": lo - 1, "maximum": hi}
        return s
    # JSON Schema puts no bound on a float's digits, and a random model is as happy to
    # write one more digit as to end the number: multipleOf bounds the decimals
    return {"type": "number", "minimum": lo, "maximum": hi, "multipleOf": float(rng.choice([0.5, 0.25, 0.1, 0.01]))}


def _leaf(rng):
    r = rng.random()
    if r < 0.4:
        return _string(rng)
    if r < 0.7:
        return _number(rng)
    if r < 0.8:
        return {"type": "boolean"}
    if r < 0.85:
        return {"type": "null"}
    if r < 0.93:
        return {"enum": [1, "two", None, True, 3.5][:int(rng.integers(1, 6))]}
    return {"const": str(rng.choice(WORDS))}


def _object(rng, depth):
    names = list(rng.choice(KEYS, int(rng.integers(1, 5)), replace=False))
    props = {str(n): random_schema(rng, depth + 1) for n in names}
    required = [n for n in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_schema(rng, depth=0):
    """A random JSON schema within the supported subset (objects, arrays, strings, numbers, enums, anyOf).

    Args:
        rng: a numpy Generator.
        depth: nesting level of this schema (deeper ones are leaves more often).
    """
    r = rng.random() if depth < 3 else 1.0
    if r < 0.35:
        return _object(rng, depth)
    if r < 0.55:
        s = {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": int(rng.integers(0, 4))}
        if rng.random() < 0.4:
            s["minItems"] = int(rng.integers(0, s["maxItems"] + 1))
        return s
    if r < 0.65:
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    return _leaf(rng)


def random_schemas(n, seed):
    """n random schemas, each with an object at the top as APIs require (the first uses $defs/$ref)."""
    rng = np.random.default_rng(seed)
    out = [{"$defs": {"point": {"type": "object", "properties": {"x": _number(rng), "y": _number(rng)},
                                "required": ["x", "y"], "additionalProperties": False}},
            "type": "object", "properties": {"a": {"$ref": "#/$defs/point"},
                                             "path": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                                      "maxItems": 3}},
            "required": ["a", "path"], "additionalProperties": False}]
    while len(out) < n:
        out.append(_object(rng, 0))
    return out


def _obj(props, required=None):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


# Schemas of the kinds applications send (function parameters, extraction, UI), strings unbounded.
REAL_WORLD = {
    "weather": _obj({"location": {"type": "string", "description": "City and country, e.g. Paris, France"},
                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}),
    "person": _obj({"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "email": {"type": "string", "format": "email", "maxLength": 40}}, ["name", "age"]),
    "event": _obj({"name": {"type": "string"}, "date": {"type": "string", "format": "date"},
                   "participants": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}),
    "math_reasoning": _obj({"steps": {"type": "array", "maxItems": 3,
                                      "items": _obj({"explanation": {"type": "string"},
                                                     "output": {"type": "string"}})},
                            "final_answer": {"type": "string"}}),
    "product": _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                     "price": {"type": "number", "minimum": 0, "multipleOf": 0.01},
                     "currency": {"enum": ["EUR", "USD", "GBP"]},
                     "in_stock": {"type": "boolean"},
                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5}}),
    "address": _obj({"street": {"type": "string"}, "city": {"type": "string"},
                     "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
                     "country": {"type": "string", "minLength": 2, "maxLength": 2}}, ["street", "city"]),
    "github_issue": _obj({"title": {"type": "string", "maxLength": 80},
                          "labels": {"type": "array", "items": {"enum": ["bug", "feature", "docs", "question"]},
                                     "maxItems": 3},
                          "priority": {"type": "integer", "minimum": 1, "maximum": 5}}),
    "sentiment": _obj({"sentiment": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}}),
    "search_call": _obj({"query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1,
                                                                      "maximum": 50},
                         "filters": {"anyOf": [{"type": "null"},
                                               _obj({"since": {"type": "string", "format": "date"}})]}},
                        ["query"]),
    "recipe": _obj({"title": {"type": "string"},
                    "ingredients": {"type": "array", "maxItems": 4,
                                    "items": _obj({"item": {"type": "string"},
                                                   "grams": {"type": "integer", "minimum": 1,
                                                             "maximum": 5000}})},
                    "vegetarian": {"type": "boolean"}}),
    "ui_component": {"$defs": {"attr": _obj({"name": {"type": "string"}, "value": {"type": "string"}})},
                     **_obj({"type": {"enum": ["div", "button", "header", "section", "field", "form"]},
                             "label": {"type": "string"},
                             "attributes": {"type": "array", "items": {"$ref": "#/$defs/attr"}, "maxItems": 2}})},
    "moderation": _obj({"flagged": {"type": "boolean"},
                        "categories": {"type": "array", "items": {"type": "string",
                                                                  "enum": ["violence", "hate", "spam"]},
                                       "maxItems": 3}}),
    "coordinates": _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.0001},
                         "lon": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.0001}}),
    "translation": _obj({"source_language": {"type": "string", "enum": ["en", "fr", "de", "es"]},
                         "text": {"type": "string"}, "id": {"type": "string", "format": "uuid"}}),
}


def dumps(schema):
    return json.dumps(schema, ensure_ascii=False)
