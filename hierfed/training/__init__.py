"""Training on one rank: batches (batches.py), the local step and evaluation (local.py), and the
torch device and threads a rank uses (devices.py). No MPI here."""

from hierfed.training.batches import Tokenized, tokenize
from hierfed.training.devices import configure_threads, local_rank, torch_device
from hierfed.training.local import LocalTrainer, load_optimizer_arrays, make_optimizer, optimizer_arrays

__all__ = ["LocalTrainer", "Tokenized", "configure_threads", "load_optimizer_arrays", "local_rank", "make_optimizer",
           "optimizer_arrays", "tokenize", "torch_device"]
