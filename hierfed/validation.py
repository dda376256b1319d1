"""Turn pydantic validation errors into the one-line messages hierfed promises for bad input.

Every bad topology file, run config, --set override or data config ends up here:
`first_error(err, source)` gives "<source>: <field.path[i]>: <why> (got <value>)", plus a count of
any further problems, on one line. `show(value)` renders a bad value the same way for messages that
hierfed builds itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

# What a value "must be", by pydantic error type (the bounds and lengths are built from ctx).
_MUST_BE = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "null",
}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
           "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}
# Location parts pydantic adds for the members of a union (besides "literal[...]", "function-...[...]",
# "list[str]" and model class names): the core schema's type names.
_TYPE_TAGS = frozenset({"any", "bool", "bytes", "date", "datetime", "decimal", "dict", "float", "frozenset",
                        "int", "list", "none", "set", "str", "time", "timedelta", "tuple", "url", "uuid"})


def show(v: Any) -> str:
    """A short YAML-ish rendering of a bad value for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def field_path(loc: tuple) -> str:
    """('edges', 1, 'devices', 0, 'ranks') -> 'edges[1].devices[0].ranks'; a bad mapping key -> '... key'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " key"
        else:
            out += ("." if out else "") + str(part)
    return out


def one_line(err: ValidationError) -> str:
    """The first problem pydantic found as "field.path: why (got value)", plus a count of the rest.

    The members of a union (`bool | Literal["auto"]`) fail together: they are one problem, said as
    "must be a boolean or 'auto'", and their type names are left out of the path.
    """
    errors: list[dict[str, Any]] = [dict(e) for e in err.errors(include_url=False)]  # pydantic's TypedDicts, as plain dicts
    problems: dict[tuple, list[dict]] = {}  # field location -> its errors (several for a union)
    for e in errors:
        loc = tuple(p for i, p in enumerate(e["loc"]) if not _union_member(e["loc"], i, errors))
        problems.setdefault(loc, []).append(e)
    loc, first = next(iter(problems.items()))
    why = _why(first[0]) if len(first) == 1 else _why_union(first)
    where = field_path(loc) or "top level"
    if first[0]["type"] == "extra_forbidden":  # the path names the parent; the field is the problem
        where, why = field_path(loc[:-1]) or "top level", f"unknown field {str(loc[-1])!r}"
    more = len(problems) - 1
    tail = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return " ".join(f"{where}: {why}{tail}".split())


def first_error(err: ValidationError, source: str) -> str:
    """One line: '<source>: <field>: <why> (got <value>)' for the first problem pydantic found."""
    return f"{source}: {one_line(err)}"


def _looks_like_tag(part: Any) -> bool:
    return isinstance(part, str) and part != "[key]" and (
        "[" in part or part.startswith("function-") or part in _TYPE_TAGS
        or (part[:1].isupper() and part.isidentifier()))  # a model class in a union


def _union_member(loc: tuple, i: int, errors: list[dict]) -> bool:
    """Is loc[i] the tag of a union member? Tags come in sets (one error per member), which keeps a
    mapping key that merely looks like a type name ('int', 'Phone') in the path."""
    if not _looks_like_tag(loc[i]):
        return False
    return any(len(o["loc"]) > i and o["loc"][:i] == loc[:i] and o["loc"][i] != loc[i]
               and _looks_like_tag(o["loc"][i]) for o in errors)


def _must_be(e: dict) -> str | None:
    """What the value must be, e.g. "an integer", ">= 1", "'cpu' or 'cuda'"; None if unknown."""
    kind, ctx = e["type"], e.get("ctx") or {}
    if kind in _MUST_BE:
        return _MUST_BE[kind]
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx[key]
        return f"{op} {bound:g}" if isinstance(bound, (int, float)) else f"{op} {bound}"
    if kind == "literal_error":
        return str(ctx["expected"])
    return None


def _why(e: dict) -> str:
    kind, ctx, got = e["type"], e.get("ctx") or {}, f"(got {show(e.get('input'))})"
    if kind == "value_error":  # our own validators: their message is complete
        return str(ctx.get("error", e["msg"])).removeprefix("Value error, ")
    if kind == "missing":
        return "required field is missing"
    what = "characters" if kind.startswith("string_") else "items"
    if kind in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must have at least {n} {what} {got}"
    if kind in ("too_long", "string_too_long"):
        return f"must have at most {ctx.get('max_length')} {what} {got}"
    must = _must_be(e)
    if must is not None:
        return f"must be {must} {got}"
    msg = e["msg"]
    return f"{msg[0].lower()}{msg[1:]} {got}"


def _why_union(members: list[dict]) -> str:
    """A union's members all failed: "must be A or B (got x)" when each says what it must be."""
    musts = [_must_be(e) for e in members]
    if None in musts:
        return _why(members[0])
    alts = list(dict.fromkeys(m for m in musts if m is not None))  # none is None (returned above)
    said = alts[0] if len(alts) == 1 else f"{', '.join(alts[:-1])} or {alts[-1]}"
    return f"must be {said} (got {show(members[0].get('input'))})"


class KnownFields(BaseModel):
    """A strict section of an input file: an unknown key is an error that lists the allowed ones
    (the same check as extra="forbid", with a message a user can act on)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = [f.alias or n for n, f in cls.model_fields.items()]
            unknown = [k for k in data if k not in allowed]
            if unknown:
                raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")
        return data
