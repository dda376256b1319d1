"""Task data for federated fine-tuning: built-in tasks, JSONL and datasets-on-disk sources, the
fortune-package workloads, instruction JSONL, and partitioners (iid, Dirichlet, natural, shelves).
Pure: no MPI, torch or tokenisation here.

    task = load_data(DataConfig(source="topics"))
    shards = partition(task.train, num_clients=8, scheme="dirichlet", alpha=0.3, seed=7)
    mine = take(task.train, shards[3])  # client 3's examples (a datasets directory's stay on disk)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hierfed.data.files import Rows, load_files
from hierfed.data.fortunes import fortunes
from hierfed.data.instruct import instruct
from hierfed.data.partition import SCHEMES, label_skew, partition
from hierfed.data.schema import DataConfig, Example, TaskData
from hierfed.data.tasks import corpus, topics

__all__ = [
    "DataConfig", "Example", "TaskData", "SCHEMES",
    "load_data", "partition", "label_skew", "take",
]


def take(examples: Sequence[Example], indices: np.ndarray) -> Sequence[Example]:
    """The examples at `indices` (a client's shard): a tuple, or for a datasets directory `Rows`
    that stay memory-mapped (`Rows.select`) until a rank reads them; the rest of the dataset is
    never read into memory."""
    if isinstance(examples, Rows):
        return examples.select(indices)
    return tuple(examples[int(i)] for i in indices)


# The last task built in this process, by its config: a rank's pre-flight (hierfed run's `prepare`)
# and its role ask for the same task, which is then read, cleaned and held once, not twice. One
# entry: a process runs one job. Callers treat a TaskData as read-only (partitions are index arrays).
_last: tuple[str, TaskData] | None = None


def load_data(cfg: DataConfig) -> TaskData:
    """The train/eval examples named by `cfg` (deterministic given cfg.seed); built once per process
    for the same config."""
    global _last
    key = cfg.model_dump_json()
    if _last is None or _last[0] != key:
        _last = None  # drop the old task before building the new one
        _last = (key, _build(cfg))
    return _last[1]


def _build(cfg: DataConfig) -> TaskData:
    if cfg.source == "topics":
        return topics(cfg)
    if cfg.source == "corpus":
        return corpus(cfg)
    if cfg.source == "fortunes":
        return fortunes(cfg)
    if cfg.source == "instruct":
        return instruct(cfg)
    return load_files(cfg)
