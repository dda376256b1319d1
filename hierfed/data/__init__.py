"""Task data for federated fine-tuning: built-in tasks, JSONL and datasets-on-disk sources, the
fortune-package workloads, instruction JSONL, and partitioners (iid, Dirichlet, natural, shelves).
Pure: no MPI, torch or tokenisation here.

    task = load_data(DataConfig(source="topics"))
    shards = partition(task.train, num_clients=8, scheme="dirichlet", alpha=0.3, seed=7)
"""

from __future__ import annotations

from hierfed.data.files import load_files
from hierfed.data.fortunes import fortunes
from hierfed.data.instruct import instruct
from hierfed.data.partition import SCHEMES, label_skew, partition
from hierfed.data.schema import DataConfig, Example, TaskData
from hierfed.data.tasks import corpus, topics

__all__ = [
    "DataConfig", "Example", "TaskData", "SCHEMES",
    "load_data", "partition", "label_skew",
]


def load_data(cfg: DataConfig) -> TaskData:
    """The train/eval examples named by `cfg` (deterministic given cfg.seed)."""
    if cfg.source == "topics":
        return topics(cfg)
    if cfg.source == "corpus":
        return corpus(cfg)
    if cfg.source == "fortunes":
        return fortunes(cfg)
    if cfg.source == "instruct":
        return instruct(cfg)
    return load_files(cfg)
