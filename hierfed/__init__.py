"""hierfed: hierarchical cloud-edge-device federated fine-tuning over MPI."""

__version__ = "0.1.0"
