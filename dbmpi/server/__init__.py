"""The sharded parameter server over MPI one-sided RMA: primitives (:mod:`.rma`), the shard
(:mod:`.shard`), the client (:mod:`.client`) and the collective start-up (:mod:`.setup`)."""

from .client import PSClient
from .rma import HEADER, Window, inbox_slots, probe_progress
from .setup import PSSetup
from .shard import ShardServer

__all__ = ["PSClient", "PSSetup", "ShardServer", "Window", "HEADER", "inbox_slots",
           "probe_progress"]
