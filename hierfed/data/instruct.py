"""Instruction-tuning data: JSON Lines of Alpaca records (`instruction`, optional `input`,
`output`), prompt/response pairs (`prompt`, `response`) or chat transcripts (`messages`: a list of
{role, content} with roles system/user/assistant, ending with the assistant's reply).

Every record becomes a conversation (Example.messages): the last assistant message is the response
that is trained and scored; everything before it is the prompt (hierfed.training.instruct renders it
with the tokenizer's chat template, or the plain template, and masks it out of the loss). Formats
may be mixed line by line. A record with `client_field` set belongs to that client (the natural
partition).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import overload

from hierfed.data.files import holdout
from hierfed.data.schema import DataConfig, Example, TaskData
from hierfed.errors import HierfedError

ROLES = ("system", "user", "assistant")
Messages = tuple[tuple[str, str], ...]


def plain_text(messages: Messages) -> str:
    """The plain template (also Example.text): `### User:\\n...\\n\\n### Assistant:\\n...` per message."""
    return "".join(f"### {role.capitalize()}:\n{content}\n\n" for role, content in messages).rstrip("\n")


@overload
def _str(row: dict, key: str, where: str) -> str: ...
@overload
def _str(row: dict, key: str, where: str, *, required: bool) -> str | None: ...
def _str(row: dict, key: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise HierfedError(f"{where}: {key!r} must be a non-empty string")
    return value


def to_messages(row: dict, where: str) -> Messages:
    """The conversation of one record, whichever of the three formats it uses."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise HierfedError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise HierfedError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: string}}")
            out.append((m["role"], m["content"]))
        if out[-1][0] != "assistant" or not out[-1][1].strip():
            raise HierfedError(f"{where}: the last message must be the assistant's (non-empty): it is the response that is trained")
        if len(out) < 2:
            raise HierfedError(f"{where}: 'messages' needs a prompt before the assistant's reply")
        return tuple(out)
    if "instruction" in row:
        instruction, extra = _str(row, "instruction", where), _str(row, "input", where, required=False)
        user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
        return (("user", user), ("assistant", _str(row, "output", where)))
    if "prompt" in row:
        return (("user", _str(row, "prompt", where)), ("assistant", _str(row, "response", where)))
    raise HierfedError(f"{where}: no 'instruction'/'output', 'prompt'/'response' or 'messages' fields")


def read_instruct(path: str, cfg: DataConfig, key: str) -> list[Example]:
    """The conversations of the JSON Lines file data.<key>; one line per problem."""
    origin = f"data.{key}={path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise HierfedError(f"{origin}: no such file")
    out = []
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{origin}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HierfedError(f"{where} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise HierfedError(f"{where} must be a JSON object, got {type(row).__name__}")
            msgs = to_messages(row, where)
            client = row.get(cfg.client_field)
            out.append(Example(plain_text(msgs), None, None if client is None else str(client), None, msgs))
    if not out:
        raise HierfedError(f"{origin}: the file has no records")
    return out


def instruct(cfg: DataConfig) -> TaskData:
    """A causal-LM task whose examples carry conversations; eval from data.eval_path or held out."""
    assert cfg.path is not None  # DataConfig's validator guarantees it
    train = read_instruct(cfg.path, cfg, "path")
    if cfg.eval_path is not None:
        eval_ = read_instruct(cfg.eval_path, cfg, "eval_path")
    else:
        train, eval_ = holdout(train, cfg.eval_fraction, cfg.seed, f"data.path={cfg.path}")
    return TaskData("causal_lm", tuple(train), tuple(eval_), None)
