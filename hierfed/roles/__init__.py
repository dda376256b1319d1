"""The cloud, edge and device loops. Each is a thin loop over the parts below it; `run_role` picks
the loop from the rank's Role in the Placement (never from a rank number)."""

from __future__ import annotations

import importlib

_LOOPS = {"cloud": "hierfed.roles.cloud", "edge": "hierfed.roles.edge", "device": "hierfed.roles.device"}


def run_role(rt, cfg) -> None:
    from hierfed.runtime.usage import report_memory

    # Imported lazily: an edge rank aggregates flat vectors and never imports torch or transformers.
    importlib.import_module(_LOOPS[rt.role.kind]).run(rt, cfg)
    report_memory(rt)  # every rank's peak memory into summary.json; collective: every rank has finished its loop
    if rt.when_all_ranks_done is not None:
        rt.when_all_ranks_done()
