"""The run loop's stop rules and the algorithm registry, without MPI or clocks: every
rule is driven by a zero or an unreachable period, never by how fast the machine is."""

import pytest

from dbmpi.algorithms import ALGORITHMS
from dbmpi.algorithms.loop import DIVERGED, DONE, RunLoop
from dbmpi.config import ConfigError, RunConfig, parse, ranks_needed
from dbmpi.topology import role_of

NEVER = 1e9


def _run(step_bits, accuracy=None, **run):
    """Drive a loop whose step returns ``step_bits(n)`` at its n-th call (from 1); returns
    (stop reason, steps, evaluations, checkpoints)."""
    cfg = RunConfig(**{**dict(max_time_s=NEVER, eval_every_s=NEVER,
                              checkpoint_every_s=NEVER), **run})
    n = {"steps": 0, "evals": 0, "ckpts": 0}

    def step():
        n["steps"] += 1
        return step_bits(n["steps"])

    def evaluate():
        n["evals"] += 1
        return {"accuracy": accuracy(n["evals"]), "loss": 0.0}

    def checkpoint():
        n["ckpts"] += 1

    loop = RunLoop(cfg)
    return loop.run(step, evaluate, checkpoint), n["steps"], n["evals"], n["ckpts"]


def test_the_loop_stops_when_the_step_is_through():
    assert _run(lambda k: DONE if k == 5 else 0) == ("max_steps", 5, 0, 0)


def test_a_step_gives_its_own_reason():
    loop = RunLoop(RunConfig(max_time_s=NEVER, eval_every_s=NEVER, checkpoint_every_s=NEVER))
    assert loop.run(lambda: loop.done("converged"), None, None) == "converged"


def test_evaluations_and_checkpoints_follow_their_periods_and_the_target_stops():
    # evaluate and checkpoint every step; the third evaluation reaches the target
    got = _run(lambda k: 0, accuracy=lambda e: 0.5 + 0.2 * e, eval_every_s=0.0,
               checkpoint_every_s=0.0, target_accuracy=0.97)
    assert got == ("target_accuracy", 3, 3, 2)      # no checkpoint in the stopping step


def test_the_time_limit_and_divergence_stop_the_loop():
    assert _run(lambda k: 0, max_time_s=0.0) == ("max_time_s", 1, 0, 0)
    assert _run(lambda k: DIVERGED if k == 4 else 0, checkpoint_every_s=0.0) == \
        ("diverged", 4, 0, 3)


def test_preemption_stops_the_loop(monkeypatch):
    import dbmpi.algorithms.loop as loop_module
    monkeypatch.setattr(loop_module, "preempted", lambda: True)
    assert _run(lambda k: 0) == ("preempted", 1, 0, 0)


def test_agreement_carries_every_ranks_bits():
    """Bits another rank found (its agreement ORs them in) stop this rank too."""
    loop = RunLoop(RunConfig(max_time_s=NEVER, eval_every_s=NEVER, checkpoint_every_s=NEVER),
                   lead=False, agree=lambda bits: bits | DIVERGED)
    assert loop.run(lambda: 0, None, None) == "diverged"


def _cfg(algorithm, **cluster):
    return parse({"optimizer": {"algorithm": algorithm}, "cluster": cluster,
                  "model": {"input_shape": [1, 8, 8], "layers": [
                      {"type": "softmax", "classes": 10}]}}, "t.toml")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_the_registry_decides_ranks_and_roles(name):
    algo = ALGORITHMS[name]
    assert callable(algo.run)
    reps = 1 if algo.one_replica else 2
    cfg = _cfg(name, ps_shards=3, replicas=reps, partitions=2)
    S = 3 if algo.parameter_server else 0
    assert ranks_needed(cfg) == (1 + S if S else 0) + 2 * reps
    roles = [role_of(r, cfg)[0] for r in range(ranks_needed(cfg))]
    assert roles.count("coordinator") == int(algo.parameter_server)
    assert roles.count("shard") == S and roles.count("replica") == 2 * reps
    if algo.one_replica:
        with pytest.raises(ConfigError, match="cluster.replicas"):
            _cfg(name, replicas=2)
