"""What of a JSON schema xgrammar 0.2.9 holds, checked before it compiles (pure Python).

xgrammar accepts more of JSON Schema than it enforces: some keywords it drops with a
warning in its log, others silently, and the output then ends ``stop`` without matching
the schema. ``enforceable`` refuses each of them with what to change (``ValueError``), so
that every output of an accepted schema parses and matches it (docs/operations.md,
"Structured output"), and rewrites two forms it holds in another spelling.
"""

from __future__ import annotations

import json
from typing import Any

_VALUES = {"enum", "const", "default", "examples", "required", "dependentRequired"}  # not schemas
_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
NOT_HELD = {  # keyword -> what to do instead
    "not": "remove it",
    "allOf": "merge its schemas into one",
    "if": "use anyOf of the allowed shapes", "then": "use anyOf of the allowed shapes",
    "else": "use anyOf of the allowed shapes",
    "dependentRequired": "list the names in required, or use anyOf of the allowed shapes",
    "dependentSchemas": "use anyOf of the allowed shapes",
    "dependencies": "use anyOf of the allowed shapes",
    "contains": "use prefixItems or items", "minContains": "remove it",
    "maxContains": "remove it",
    "unevaluatedProperties": "use additionalProperties",
    "unevaluatedItems": "use items", "$dynamicRef": "use $ref to #/$defs/...",
}
_OPEN_KEYS = ("additionalProperties", "patternProperties", "propertyNames")


def enforceable(schema: str) -> str:
    """``schema`` as xgrammar is given it: ``ValueError`` saying what to change for what
    it would not enforce (``NOT_HELD``; ``uniqueItems``; a ``$ref`` outside the schema;
    ``multipleOf`` of a non-integer; ``required`` names ``properties`` lacks; a count of
    properties where keys are open: they may repeat; a string's length beside its
    ``pattern`` or ``format``: only one of them is held); an ``allOf`` of one schema is
    that schema, and each plain string's ``minLength``/``maxLength`` (no ``enum`` or
    ``const``) is said as the pattern ``^.{min,max}$``: its length rule lets raw control
    characters into the string, which no strict JSON parser takes; its pattern rule does
    not (the same strings otherwise)."""
    root = json.loads(schema)
    try:
        json.dumps(root, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:  # a "\ud800" escape, which xgrammar cannot parse
        raise ValueError(f"it holds a lone surrogate (U+{ord(e.object[e.start]):04X}): send "
                         "strings that encode as UTF-8") from None
    changed = False
    for node in _schemas(root):
        changed |= _one_of_all(node)
        _check_held(node)
        changed |= _lengths_as_pattern(node)
    return json.dumps(root) if changed else schema


def _schemas(root: Any):
    """Every schema in ``root`` (its dicts, those of ``_MAPS`` by value), each before the
    schemas inside it."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            for key, value in node.items():
                if key in _MAPS and isinstance(value, dict):
                    stack.extend(value.values())
                elif key not in _VALUES:
                    stack.append(value)


def _one_of_all(node: dict) -> bool:
    """``{"allOf": [S], ...}`` (pydantic's spelling of a ``$ref`` with a description) as S
    with the other keys, where they do not overlap; whether it changed ``node``."""
    parts = node.get("allOf")
    if not (isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], dict)
            and not (parts[0].keys() & node.keys() - {"allOf"})):
        return False
    del node["allOf"]
    node.update(parts[0])
    return True


def _check_held(node: dict) -> None:
    for key, fix in NOT_HELD.items():
        if key in node:
            raise ValueError(f"{key!r} would not be enforced: {fix}")
    if node.get("uniqueItems") is True:
        raise ValueError("'uniqueItems' would not be enforced: remove it")
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise ValueError(f"$ref {ref[:80]!r} is outside the schema and would not be "
                         "enforced: put its schema under $defs and refer to #/$defs/...")
    if "multipleOf" in node and node.get("type") != "integer":
        raise ValueError("'multipleOf' is enforced only on \"type\": \"integer\": set that "
                         "type, or remove it")
    _check_object(node)


def _check_object(node: dict) -> None:
    required, properties = node.get("required"), node.get("properties")
    if isinstance(required, list):
        missing = [n for n in required
                   if not isinstance(properties, dict) or n not in properties]
        if missing:
            raise ValueError(f"required names {missing[0]!r}, which properties does not "
                             "define: required is enforced for defined properties only; "
                             "define it there")
    counted = next((k for k in ("minProperties", "maxProperties") if k in node), None)
    if counted and (any(k in node for k in _OPEN_KEYS[1:])
                    or node.get("additionalProperties", True) is not False):
        raise ValueError(f"{counted!r} would not be enforced where keys are open (they may "
                         "repeat): name the properties and set additionalProperties false, "
                         "or remove it")


def _lengths_as_pattern(node: dict) -> bool:
    """A plain string's length bounds as a pattern; whether it changed ``node``."""
    if "minLength" not in node and "maxLength" not in node:
        return False
    if other := next((k for k in ("pattern", "format") if k in node), None):
        raise ValueError(f"a string's {other} and its minLength/maxLength cannot both "
                         "be enforced: put the length into a pattern (e.g. "
                         "^[a-z]{1,3}$) and drop minLength/maxLength, or drop one")
    lengths = [node.get("minLength", 0), node.get("maxLength", "")]
    if node.get("type") == "string" and not {"enum", "const"} & node.keys() \
            and all(isinstance(n, int) or n == "" for n in lengths):
        node["pattern"] = f"^.{{{lengths[0]},{lengths[1]}}}$"
        node.pop("minLength", None)  # xgrammar would log that it ignores them
        node.pop("maxLength", None)
        return True
    return False
