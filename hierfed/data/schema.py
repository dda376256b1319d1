"""The data section of a run config and the plain records every source produces."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pydantic

from hierfed.validation import KnownFields

BUILTIN_SOURCES = ("topics", "corpus")
FILE_SOURCES = ("jsonl", "disk", "instruct")


class DataConfig(KnownFields):
    """Where the task's examples come from and how they are split across clients."""

    source: Literal["topics", "corpus", "jsonl", "disk", "fortunes", "instruct"] = "topics"
    # jsonl file, or a directory written by datasets' save_to_disk; instruct: a JSONL of instruction
    # records (hierfed.data.instruct); fortunes: the fortune directory (default /usr/share/games/fortunes)
    path: str | None = None
    eval_path: str | None = None  # optional separate eval file/dir; else eval_fraction is held out
    eval_fraction: float = pydantic.Field(0.1, gt=0.0, le=0.5)
    text_field: str = pydantic.Field("text", min_length=1)
    label_field: str = pydantic.Field("label", min_length=1)  # absent/None labels -> causal LM
    client_field: str = pydantic.Field("client", min_length=1)  # for the natural partition
    train_samples: int = pydantic.Field(2000, gt=0)  # built-in tasks only
    eval_samples: int = pydantic.Field(400, gt=0)  # built-in tasks; fortunes: the eval set's cap
    # fortunes (hierfed.data.fortunes): category classification or multilingual causal LM
    task: Literal["category", "lm"] = "category"
    categories: int = pydantic.Field(10, ge=2)  # category task: the K English categories with most records
    shelf: int = pydantic.Field(2, ge=1)  # category task: categories per shelf (the group; the shelves partition)
    languages: list[str] = pydantic.Field(default_factory=lambda: ["en"], min_length=1)  # lm task: en de es it pl ru zh ...
    max_chars: int = pydantic.Field(400, ge=20)  # records longer than this (after cleaning) are skipped
    partition: Literal["iid", "dirichlet", "natural", "shelves"] = "iid"
    alpha: float = pydantic.Field(0.5, gt=0.0)  # Dirichlet concentration
    seed: int = pydantic.Field(1234, ge=0)  # the task's own seed: the data does not change with the run seed

    @pydantic.model_validator(mode="after")
    def _path_matches_source(self) -> DataConfig:
        if self.source in FILE_SOURCES and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source}")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError(f"data.languages lists a language twice: {self.languages}")
        bad = [x for x in self.languages if not re.fullmatch(r"[a-z]{2,3}", x)]
        if bad:
            raise ValueError(f"data.languages: {bad[0]!r} is not a language code such as en, de, zh")
        if self.source == "fortunes" and self.eval_path is not None:
            raise ValueError("data.eval_path is not used by data.source=fortunes (eval is held out per group)")
        if self.source in BUILTIN_SOURCES:
            for name in ("path", "eval_path"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"data.{name} is not used by the built-in source {self.source!r}; "
                        "use source=jsonl or source=disk to read files"
                    )
        return self


@dataclass(frozen=True)
class Example:
    """One record: the text, its class id (classification only), the client that owns it, and the
    group the per-group evaluation reports it under (a category shelf, a language; None: no groups)."""

    text: str
    label: int | None = None
    client: str | None = None
    group: str | None = None
    # instruction tuning: the conversation, (role, content) pairs; its last (assistant) message is
    # the response that is trained and scored (hierfed.data.instruct); None for plain text
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class TaskData:
    """A whole task: train/eval examples and, for classification, the class names. train and eval
    are tuples, or for a datasets directory `hierfed.data.files.Rows` (read from disk on access)."""

    kind: Literal["classification", "causal_lm"]
    train: Sequence[Example]
    eval: Sequence[Example]
    labels: tuple[str, ...] | None  # class names, index = label id (classification)
    groups: tuple[str, ...] | None = None  # the groups of Example.group, in report order; None: no groups

    @property
    def num_labels(self) -> int | None:
        return None if self.labels is None else len(self.labels)
