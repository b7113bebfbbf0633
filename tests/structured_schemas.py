"""100 varied JSON schemas with short instances, for the structured-output tests: objects with
required fields, enums, arrays with min/max items, nested objects, bounded integers and numbers,
strings with patterns and maxLength, booleans, nulls and anyOf (additionalProperties false keeps
the instances short enough for a few dozen tokens)."""

from __future__ import annotations

NAMES = ("id", "name", "city", "color", "size", "level", "code", "mood", "team", "tag")
WORDS = (("red", "green", "blue"), ("low", "mid", "high"), ("cat", "dog"), ("yes", "no", "maybe"),
         ("north", "south", "east", "west"), ("a", "b", "c", "d"), ("on", "off"),
         ("small", "large"), ("alpha", "beta", "gamma"), ("up", "down"))
PATTERNS = (r"^[A-Z]{2}[0-9]{2}$", r"^[a-z]{3,5}$", r"^[0-9]{3}-[0-9]{2}$", r"^(ab|cd)+$",
            r"^x[0-9a-f]{4}$", r"^[A-Z][a-z]{1,6}$", r"^[0-9]{1,4}$", r"^(yes|no)$",
            r"^[a-c]{2}[x-z]$", r"^v[0-9]\.[0-9]$")


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None
            else required, "additionalProperties": False}


def _family(kind: int, i: int) -> dict:
    a, b = NAMES[i], NAMES[(i + 3) % 10]
    lo = i * 7 - 20
    if kind == 0:  # required string with maxLength, bounded integer
        return _obj({a: {"type": "string", "maxLength": 4 + i % 5},
                     b: {"type": "integer", "minimum": lo, "maximum": lo + 10 + i}})
    if kind == 1:  # enums
        return _obj({a: {"enum": list(WORDS[i])},
                     b: {"type": "string", "enum": list(WORDS[9 - i])}})
    if kind == 2:  # array with min/max items
        return _obj({a: {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                     "maximum": 9 + i},
                         "minItems": 1 + i % 3, "maxItems": 2 + i % 3}})
    if kind == 3:  # nested objects
        return _obj({a: _obj({b: {"type": "boolean"},
                              "n": {"type": "integer", "minimum": 0, "maximum": 5 + i}}),
                     "ok": {"type": "boolean"}})
    if kind == 4:  # bounded numbers (exclusive and inclusive)
        return _obj({a: {"type": "number", "minimum": lo, "maximum": lo + 2 + i},
                     b: {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1 + i}})
    if kind == 5:  # string patterns
        return _obj({a: {"type": "string", "pattern": PATTERNS[i]}})
    if kind == 6:  # booleans and nulls
        return _obj({a: {"type": "boolean"}, b: {"type": "null"},
                     "c": {"type": ["null", "boolean"]}})
    if kind == 7:  # anyOf
        return _obj({a: {"anyOf": [{"type": "integer", "minimum": i, "maximum": i + 5},
                                   {"type": "string", "maxLength": 3}, {"type": "null"}]}})
    if kind == 8:  # optional fields (only some required)
        return _obj({a: {"type": "integer", "minimum": -5, "maximum": 5},
                     b: {"type": "string", "maxLength": 3}, "flag": {"type": "boolean"}},
                    required=[a])
    # arrays of enums / of small objects, a top-level array every other time
    items = {"enum": list(WORDS[i])} if i % 2 else _obj({"k": {"type": "integer", "minimum": 0,
                                                                 "maximum": 3}})
    array = {"type": "array", "items": items, "minItems": 1, "maxItems": 2}
    return array if i % 4 == 0 else _obj({a: array})


def schemas() -> list[dict]:
    """The 100 schemas: 10 families x 10 variations."""
    return [_family(kind, i) for kind in range(10) for i in range(10)]
