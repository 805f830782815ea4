"""The one run loop every algorithm trains under.

The loop owns the clocks and the stop rules of ``[run]``: evaluation and checkpoint cadence
(``eval_every_s``, ``checkpoint_every_s``), the time limit (``max_time_s``), the target
accuracy, preemption (SIGTERM/SIGUSR1) and divergence.  One rank, the *lead*, decides;
``agree`` carries its decision, with every rank's own findings, to all the ranks that move
together (a bitwise OR over them: the identity in one process).  The algorithm brings its
own callbacks:

- ``step()``: one step of training (sgd, sync), of message handling (a Downpour
  coordinator), or one L-BFGS iteration (Sandblaster); returns this rank's bits: 0, or
  ``DIVERGED`` (nothing was applied), or ``DONE`` (through: its max_steps, or its own end,
  see :meth:`RunLoop.done`);
- ``evaluate()``: evaluates (collective as the algorithm needs), logs, and returns the
  metrics dict on the lead (None elsewhere);
- ``checkpoint()``: writes the checkpoint (collective as the algorithm needs).

After the loop, each algorithm evaluates and checkpoints once more and writes its summary.
"""

from __future__ import annotations

import time

import numpy as np

from ..mpiwait import wait
from ..signals import preempted

__all__ = ["RunLoop", "agree_by", "EVAL", "STOP", "CHECKPOINT", "TARGET", "DIVERGED", "DONE"]

# the bits of a step's decision
EVAL, STOP, CHECKPOINT = 1, 2, 4     # the lead's: evaluate now, stop now, checkpoint now
TARGET = 8                           # the evaluation reached run.target_accuracy
DIVERGED = 16                        # NaN/Inf: the step applied nothing; stop
DONE = 32                            # the algorithm is through (max_steps, or converged)


class RunLoop:
    """The clocks, cadence and stop rules of one run (``run_cfg``: the config's ``run``
    section, dbmpi.config.RunConfig); ``stop`` is the reason the run stopped (see
    :meth:`run`).  ``timed``: keep each step's time (``step_quartiles``), for loops whose
    steps are training steps, not a coordinator's rounds of message handling."""

    def __init__(self, run_cfg, lead: bool = True, agree=None, timed: bool = False):
        self.max_time_s = run_cfg.max_time_s
        self.eval_every_s = run_cfg.eval_every_s
        self.checkpoint_every_s = run_cfg.checkpoint_every_s
        self.target = run_cfg.target_accuracy
        self.lead = lead
        self.agree = agree or (lambda bits: bits)
        self.stop = "max_steps"
        self._done_why = "max_steps"
        self.timed = timed
        self.step_s = []        # each step's time, the agreement included (not evaluations)
        self.start()

    def start(self) -> None:
        """(Re)start the clocks: call it when every rank is ready to train."""
        self.t0 = time.time()
        self.last_eval = self.last_ckpt = self.t0

    def elapsed(self) -> float:
        return time.time() - self.t0

    def done(self, why: str = "max_steps") -> int:
        """For a step that ends the run for a reason of its own ("converged"): its bits."""
        self._done_why = why
        return DONE

    def decide(self, now: float | None = None) -> int:
        """The lead's decision for this step: bits of EVAL, STOP and CHECKPOINT."""
        now = time.time() if now is None else now
        bits = EVAL if now - self.last_eval >= self.eval_every_s else 0
        if now - self.t0 >= self.max_time_s:
            bits |= STOP
            self.stop = "max_time_s"
        elif preempted():
            bits |= STOP
            self.stop = "preempted"
        if now - self.last_ckpt >= self.checkpoint_every_s:
            bits |= CHECKPOINT
        return bits

    def reached(self, ev) -> bool:
        """Whether the lead's evaluation ``ev`` reached the target accuracy."""
        return bool(self.lead and ev is not None and self.target
                    and ev["accuracy"] >= self.target)

    def run(self, step, evaluate, checkpoint) -> str:
        """Drive ``step``, ``evaluate`` and ``checkpoint`` (see the module) until a stop rule
        fires; returns the reason (a time limit's or preemption's only on the lead, which
        reports it)."""
        while True:
            t = time.perf_counter()
            bits = step()
            if self.lead:
                bits |= self.decide()
            bits = self.agree(bits)
            if self.timed:
                self.step_s.append(time.perf_counter() - t)
            if bits & DIVERGED:
                self.stop = "diverged"
                return self.stop
            if bits & DONE:            # (the evaluation after the loop is the last one)
                self.stop = self._done_why
                return self.stop
            if bits & EVAL:
                ev = evaluate()
                self.last_eval = time.time()
                if self.agree(TARGET if self.reached(ev) else 0) & TARGET:
                    self.stop = "target_accuracy"
                    return self.stop
            if bits & STOP:
                return self.stop       # the lead's reason (max_time_s, preempted)
            if bits & CHECKPOINT:
                checkpoint()
                self.last_ckpt = time.time()

    def step_quartiles(self) -> list[float]:
        """Quartiles (ms) of the steps' times: the median is the steady pace, which an
        evaluation, a checkpoint or a busy neighbour now and then does not move."""
        if not self.step_s:
            return []
        return [round(1e3 * float(v), 4) for v in np.percentile(self.step_s, [25, 50, 75])]


def agree_by(comm, lead_only: bool = False):
    """The RunLoop's agreement over ``comm`` (None: one process, nothing to agree): every
    rank's bits OR-ed, or with ``lead_only`` rank 0's bits broadcast, for ranks whose own
    bits never differ from the lead's (then the lead does not wait for the others)."""
    if comm is None or comm.Get_size() == 1:
        return None
    from mpi4py import MPI
    flag = np.zeros(1, dtype=np.int32)

    def agree(bits):
        flag[0] = bits
        if lead_only:
            wait([comm.Ibcast(flag, root=0)])
        else:
            wait([comm.Iallreduce(MPI.IN_PLACE, flag, op=MPI.BOR)])
        return int(flag[0])
    return agree
