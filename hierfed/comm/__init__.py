"""Transport between tiers: MPI channels over contiguous buffers, and the byte ledger."""

from hierfed.comm.ledger import Ledger
from hierfed.comm.channel import Channel, wait

__all__ = ["Channel", "Ledger", "wait"]
