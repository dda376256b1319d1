"""The data section of a run config and the plain records every source produces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pydantic

from hierfed.validation import KnownFields

BUILTIN_SOURCES = ("topics", "corpus")
FILE_SOURCES = ("jsonl", "disk")


class DataConfig(KnownFields):
    """Where the task's examples come from and how they are split across clients."""

    source: Literal["topics", "corpus", "jsonl", "disk"] = "topics"
    path: str | None = None  # jsonl file, or a directory written by datasets' save_to_disk
    eval_path: str | None = None  # optional separate eval file/dir; else eval_fraction is held out
    eval_fraction: float = pydantic.Field(0.1, gt=0.0, le=0.5)
    text_field: str = pydantic.Field("text", min_length=1)
    label_field: str = pydantic.Field("label", min_length=1)  # absent/None labels -> causal LM
    client_field: str = pydantic.Field("client", min_length=1)  # for the natural partition
    train_samples: int = pydantic.Field(2000, gt=0)  # built-in tasks only
    eval_samples: int = pydantic.Field(400, gt=0)  # built-in tasks only
    partition: Literal["iid", "dirichlet", "natural"] = "iid"
    alpha: float = pydantic.Field(0.5, gt=0.0)  # Dirichlet concentration
    seed: int = pydantic.Field(1234, ge=0)  # the task's own seed: the data does not change with the run seed

    @pydantic.model_validator(mode="after")
    def _path_matches_source(self) -> DataConfig:
        if self.source in FILE_SOURCES and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source}")
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
    """One record: the text, its class id (classification only) and the client that owns it."""

    text: str
    label: int | None = None
    client: str | None = None


@dataclass(frozen=True)
class TaskData:
    """A whole task: train/eval examples and, for classification, the class names."""

    kind: Literal["classification", "causal_lm"]
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    labels: tuple[str, ...] | None  # class names, index = label id (classification)

    @property
    def num_labels(self) -> int | None:
        return None if self.labels is None else len(self.labels)
