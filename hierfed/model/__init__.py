"""Models: building them (build.py), the flat vector of what trains (flat.py), and the cut of a
model into a device stage and an edge stage for split placement (cut.py). No MPI here."""

from hierfed.model.build import Built, build_model, load_tokenizer, minilm_path, peft_config
from hierfed.model.flat import FlatView

__all__ = ["Built", "FlatView", "build_model", "load_tokenizer", "minilm_path", "peft_config"]
