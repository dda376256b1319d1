"""Turn pydantic validation errors into the one-line messages hierfed promises for bad input."""

from __future__ import annotations

from pydantic import ValidationError


def field_path(loc: tuple) -> str:
    """('edges', 1, 'devices', 0, 'ranks') -> 'edges[1].devices[0].ranks'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def first_error(err: ValidationError, source: str) -> str:
    """One line: '<source>: <field>: <why> (got <value>)' for the first error pydantic found."""
    e = err.errors(include_url=False)[0]
    # Union/literal members add their type name as a location part; drop those to keep the path readable.
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    where = field_path(loc) or "(top level)"
    kind = e["type"]
    if kind == "extra_forbidden":
        parent = field_path(loc[:-1])
        return f"{source}: {parent + ': ' if parent else ''}unknown field '{loc[-1]}'"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "missing":
        return f"{source}: {where}: required field is missing"
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{source}: {where}: {msg[0].lower() + msg[1:]}{shown}"
