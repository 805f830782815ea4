"""Saves checkpoints in a loop until killed: checkpoint k holds params all equal to k and the
counter step = k.  Used by tests that SIGKILL it mid-save.  Usage: python ckpt_writer.py PATH"""

import sys

import numpy as np

from dbmpi.config import parse
from dbmpi.rundir import save_checkpoint

path, k = sys.argv[1], 0
params = np.empty(4_000_000, dtype=np.float32)
cfg = parse({"model": {"input_shape": [1, 8, 8], "layers": [{"type": "softmax", "classes": 10}]}})
while True:
    k += 1
    params[:] = k
    save_checkpoint(path, params, {"adagrad_acc": params}, {"step": k}, cfg)
    print(k, flush=True)
