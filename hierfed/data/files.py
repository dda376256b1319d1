"""Tasks read from files: JSON Lines, or a directory written by `datasets`' save_to_disk.

Both readers produce raw records; one builder turns them into a TaskData so labels are mapped the
same way for every source: int labels 0..K-1 are kept, any other labels (strings, or ints that
are not 0..K-1) become ids in sorted order. No record labelled -> a causal-LM task.

A datasets directory is memory-mapped and stays so: its records carry no text, and the task's
train and eval are `Rows`, which read a text only when an example is asked for. A rank therefore
holds in memory only the examples it uses (a device its clients' shards: `Rows.select`, the cloud
its eval set), however large the dataset on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hierfed.data.schema import DataConfig, Example, TaskData
from hierfed.errors import HierfedError


@dataclass(frozen=True)
class _Record:
    text: str | None  # None: a row of a datasets.Dataset (`source`), read only when used
    label: Any  # raw value from the file; None when unlabelled
    client: str | None
    where: str  # "line 7" / "row 7 of split 'train'", for error messages
    source: Any = None  # the memory-mapped datasets.Dataset the row is in (disk), else None
    index: int = -1  # the row's index in `source`


class Rows(Sequence[Example]):
    """Examples of a memory-mapped `datasets.Dataset`, read from it on access: the texts stay on
    disk (the page cache) until an example is asked for. Labels (ids) and clients are held, so a
    partition needs no text. `select` keeps it lazy (datasets' own index mapping)."""

    def __init__(self, ds: Any, text_field: str, labels: np.ndarray | None, clients: list[str | None] | None) -> None:
        self.ds = ds.select_columns([text_field])
        self.text_field, self.labels, self.clients = text_field, labels, clients

    def __len__(self) -> int:
        return len(self.ds)

    def _example(self, i: int, text: str) -> Example:
        return Example(text, None if self.labels is None else int(self.labels[i]), None if self.clients is None else self.clients[i])

    def __getitem__(self, i):  # an int gives an Example, a slice a Rows
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        return self._example(i, self.ds[i][self.text_field])

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), 1024):
            for j, text in enumerate(self.ds[start : start + 1024][self.text_field]):
                yield self._example(start + j, text)

    def select(self, indices: Sequence[int] | np.ndarray) -> Rows:
        """These rows at `indices`, still on disk."""
        idx = np.asarray(indices, dtype=np.int64)
        rows = Rows.__new__(Rows)
        rows.ds, rows.text_field = self.ds.select(idx), self.text_field
        rows.labels = None if self.labels is None else self.labels[idx]
        rows.clients = None if self.clients is None else [self.clients[j] for j in idx]
        return rows

    def column(self, name: str) -> list:
        """Example.<name> of every row, without reading a text (hierfed.data.partition)."""
        if name == "label":
            return [None] * len(self) if self.labels is None else self.labels.tolist()
        if name == "client":
            return [None] * len(self) if self.clients is None else list(self.clients)
        return [None] * len(self)  # group, messages: never set by a datasets directory


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _record(row: dict, cfg: DataConfig, origin: str, where: str) -> _Record:
    if cfg.text_field not in row:
        raise HierfedError(f"{origin}: {where} has no {cfg.text_field!r} field (data.text_field)")
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise HierfedError(
            f"{origin}: {where} field {cfg.text_field!r} must be a string, "
            f"got {type(text).__name__}"
        )
    label = row.get(cfg.label_field)
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise HierfedError(
            f"{origin}: {where} label {label!r} must be an integer or a string (data.label_field)"
        )
    client = row.get(cfg.client_field)
    return _Record(text, label, None if client is None else str(client), where)


def read_jsonl(cfg: DataConfig, key: str) -> list[_Record]:
    """Records of the JSON Lines file cfg.<key> (path or eval_path); blank lines are skipped but
    still counted for line numbers."""
    path = getattr(cfg, key)
    origin = f"data.{key}={path}"
    suffix = "" if key == "path" else f" of data.{key}"  # build_task reports both files as one
    file = Path(path).expanduser()
    if not file.is_file():
        raise HierfedError(f"{origin}: no such file")
    records = []
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HierfedError(
                    f"{origin}: line {lineno} is not valid JSON ({exc.msg})"
                ) from None
            if not isinstance(row, dict):
                raise HierfedError(
                    f"{origin}: line {lineno} must be a JSON object, got {type(row).__name__}"
                )
            records.append(_record(row, cfg, origin, f"line {lineno}{suffix}"))
    if not records:
        raise HierfedError(f"{origin}: the file has no records")
    return records


def _import_datasets():
    try:
        import datasets  # heavy and optional: only the disk source needs it
    except ImportError:
        raise HierfedError(
            "data.source=disk needs the 'datasets' package: pip install datasets"
        ) from None
    return datasets


def _dataset_records(ds, cfg: DataConfig, key: str, split: str) -> tuple[list[_Record], Any]:
    """Records of one datasets.Dataset, plus its ClassLabel names if the label column has them.
    Every row is checked, a batch at a time; the records keep no text (they point into `ds`)."""
    origin = f"data.{key}={getattr(cfg, key)}"
    suffix = "" if key == "path" else f" of data.{key}"
    columns = list(ds.column_names)
    if cfg.text_field not in columns:
        raise HierfedError(
            f"{origin}: split {split!r} has no column {cfg.text_field!r} (data.text_field); "
            f"columns: {', '.join(columns)}"
        )
    names = getattr(ds.features.get(cfg.label_field), "names", None)
    fields = ds.select_columns([f for f in (cfg.text_field, cfg.label_field, cfg.client_field) if f in columns])
    records = []
    for start in range(0, len(ds), 4096):
        cols = fields[start : start + 4096]
        for j in range(len(cols[cfg.text_field])):
            row = {f: values[j] for f, values in cols.items()}
            if names is not None and row.get(cfg.label_field) == -1:
                row[cfg.label_field] = None  # ClassLabel's "no label" (e.g. GLUE test splits)
            r = _record(row, cfg, origin, f"row {start + j} of split {split!r}{suffix}")
            records.append(_Record(None, r.label, r.client, r.where, ds, start + j))
    if not records:
        raise HierfedError(f"{origin}: split {split!r} has no rows")
    return records, names


def read_disk(cfg: DataConfig, key: str, *, want_eval: bool):
    """(train records, eval records or None, ClassLabel names or None) from the save_to_disk
    directory cfg.<key> (path or eval_path).

    A Dataset is all train. A DatasetDict needs "train"; its eval split is "validation", else
    "test", else None (then the caller holds out eval_fraction). Loading an eval_path
    (want_eval=True) takes "validation", "test" or "train", whichever comes first.
    """
    datasets = _import_datasets()
    path = getattr(cfg, key)
    origin = f"data.{key}={path}"
    if not Path(path).expanduser().exists():
        raise HierfedError(f"{origin}: no such directory")
    try:
        loaded = datasets.load_from_disk(str(Path(path).expanduser()))
    except Exception as exc:  # corrupt or foreign directory: report it as bad input
        raise HierfedError(f"{origin}: cannot load with datasets.load_from_disk: "
                           f"{_one_line(exc)}") from None
    if isinstance(loaded, datasets.Dataset):
        records, names = _dataset_records(loaded, cfg, key, "train")
        return records, None, names
    splits = list(loaded.keys())
    order = ["validation", "test", "train"] if want_eval else ["train"]
    main = next((s for s in order if s in loaded), None)
    if main is None:
        raise HierfedError(f"{origin}: the DatasetDict has splits {splits} but no 'train' split")
    records, names = _dataset_records(loaded[main], cfg, key, main)
    if want_eval:
        return records, None, names
    held = next((s for s in ("validation", "test") if s in loaded), None)
    eval_records = None
    if held is not None:
        eval_records, eval_names = _dataset_records(loaded[held], cfg, key, held)
        names = names or eval_names
    return records, eval_records, names


def holdout(records: list, fraction: float, seed: int, origin: str) -> tuple[list, list]:
    """Split records into (train, eval) with round(n * fraction) >= 1 held out, seeded; file order
    is kept inside each part."""
    n = len(records)
    n_eval = max(1, int(round(n * fraction)))
    if n - n_eval < 1:
        raise HierfedError(
            f"{origin}: {n} record(s) cannot be split into train and a {fraction} eval hold-out; "
            "add records or give data.eval_path"
        )
    perm = np.random.default_rng(seed).permutation(n)
    held = set(perm[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def _label_ids(records: list[_Record], origin: str, names: Any) -> tuple[dict, tuple[str, ...]]:
    """Map raw labels to ids 0..K-1, returning (raw -> id, class names)."""
    ints = [r for r in records if isinstance(r.label, int)]
    strs = [r for r in records if isinstance(r.label, str)]
    if ints and strs:
        raise HierfedError(
            f"{origin}: labels mix integers ({ints[0].where}) and strings ({strs[0].where}); "
            "use one type (data.label_field)"
        )
    values = sorted({r.label for r in records})
    if names is not None:  # a datasets ClassLabel: ids and names come with the data
        bad = [v for v in values if not 0 <= v < len(names)]
        if bad:
            raise HierfedError(f"{origin}: label {bad[0]} is outside the {len(names)} classes")
        return {i: i for i in range(len(names))}, tuple(str(n) for n in names)
    if ints and values == list(range(len(values))):
        return {v: v for v in values}, tuple(str(v) for v in values)
    return {v: i for i, v in enumerate(values)}, tuple(str(v) for v in values)


def _examples(records: list[_Record], ids: dict | None, text_field: str) -> Sequence[Example]:
    """Examples of records: a tuple, or `Rows` of the memory-mapped dataset the records point into."""
    if records and records[0].source is not None:  # one split of one datasets directory
        labels = None if ids is None else np.array([ids[r.label] for r in records], dtype=np.int64)
        clients = None if all(r.client is None for r in records) else [r.client for r in records]
        return Rows(records[0].source.select([r.index for r in records]), text_field, labels, clients)
    return tuple(Example(r.text or "", None if ids is None else ids[r.label], r.client) for r in records)


def build_task(train: list[_Record], eval_: list[_Record] | None, cfg: DataConfig,
               names: Any = None) -> TaskData:
    """TaskData from raw records: classification if every record is labelled, causal LM if none.

    Without eval records, cfg.eval_fraction of the train records is held out (seeded by cfg.seed).
    """
    origin = f"data.path={cfg.path}"
    everything = train + (eval_ or [])  # file order, so errors name the first offending line
    labelled = [r for r in everything if r.label is not None]
    ids, label_names = None, None
    if labelled:
        if len(labelled) != len(everything):
            bare = next(r for r in everything if r.label is None)
            raise HierfedError(
                f"{origin}: {labelled[0].where} has a label but {bare.where} does not; "
                "label every record or none (data.label_field)"
            )
        ids, label_names = _label_ids(everything, origin, names)
    if eval_ is None:
        train, eval_ = holdout(train, cfg.eval_fraction, cfg.seed, origin)
    kind: Literal["classification", "causal_lm"] = "causal_lm" if ids is None else "classification"
    return TaskData(kind, _examples(train, ids, cfg.text_field), _examples(eval_, ids, cfg.text_field), label_names)


def load_files(cfg: DataConfig) -> TaskData:
    """TaskData for source=jsonl or source=disk."""
    assert cfg.path is not None  # DataConfig's validator guarantees it
    names = None
    if cfg.source == "jsonl":
        train, eval_ = read_jsonl(cfg, "path"), None
        if cfg.eval_path is not None:
            eval_ = read_jsonl(cfg, "eval_path")
    else:
        train, eval_, names = read_disk(cfg, "path", want_eval=False)
        if cfg.eval_path is not None:
            eval_, _, eval_names = read_disk(cfg, "eval_path", want_eval=True)
            names = names or eval_names
    return build_task(train, eval_, cfg, names)
