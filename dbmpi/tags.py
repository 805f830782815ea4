"""Every MPI message tag dbmpi uses, by the communicator it travels on.

Tags only need to differ within one communicator; the groups below share none, so a message
on the wrong one would still not match.
"""

# -- a replica's model-partition communicator (dbmpi.model.partition) ----------------------
LOGITS = 90                  # every partition's slice of the logits (or partial sums)
GATHER = 97                  # gather_canonical: each partition's slice to partition 0
EXCHANGE0 = 100              # layer i's halo exchange: forward EXCHANGE0 + 4 i, backward + 1


def exchange(layer: int) -> int:
    """Layer ``layer``'s forward exchange tag (its backward one is one more)."""
    return EXCHANGE0 + 4 * layer


# -- the control communicator: Downpour (dbmpi.algorithms.downpour) ------------------------
LOG, DONE, STOP, WARM, GO = 11, 12, 13, 14, 15
SNAP_REQ, SNAP, DRAIN, FINISH, DIVERGED, SNAP_DATA = 16, 17, 18, 19, 20, 21

# -- the control communicator: Sandblaster (dbmpi.algorithms.sandblaster) ------------------
CMD, REPLY, WORK, DATA = 31, 32, 33, 35   # coordinator <-> shards; coordinator <-> replicas
RELAY = 34                   # on the model communicator: the lead partition's messages

# -- the parameter server's bell communicator (dbmpi.server) -------------------------------
BELL_PUSH, BELL_TAKEN, BELL_FETCH, BELL_FETCHED, BELL_PUT, BELL_PUT_DONE = 1, 2, 3, 4, 5, 6
