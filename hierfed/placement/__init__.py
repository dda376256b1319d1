"""Where the model lives when one rank cannot or should not hold it all: the split link between a
weak device and its edge (link.py; the cut itself is hierfed.model.cut), memory prices (memory.py)
and the split decisions made from them (plan.py), and DeepSpeed ZeRO edge groups (zero.py) with
their config (dsconfig.py). Import the modules themselves: memory and plan need no MPI."""
