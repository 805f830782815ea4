"""Saves checkpoints in a loop until killed: checkpoint k holds params all equal to k and the
counter step = k.  Used by tests that SIGKILL it mid-save.  Usage: python ckpt_writer.py PATH"""

import sys

import numpy as np

from dbmpi.rundir import save_checkpoint

path, k = sys.argv[1], 0
params = np.empty(4_000_000, dtype=np.float32)
while True:
    k += 1
    params[:] = k
    save_checkpoint(path, params, {"adagrad_acc": params}, {"step": k}, {"data": {"path": "x"}})
    print(k, flush=True)
