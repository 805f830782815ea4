import json

import pytest

from conftest import job_config, run_cli


def _cfg(tmp_path, digits_path, extra=""):
    return job_config(tmp_path, digits_path, "digits_sgd.toml", extra)


def test_validate_prints_ranks_and_params(tmp_path, digits_path):
    r = run_cli("validate", _cfg(tmp_path, digits_path), "--set", "cluster.partitions=1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ranks"] == 1 and out["num_params"] > 0 and out["data"]["train"] == 1348
    assert out["data_path"] == str(digits_path)


def test_data_make_script(tmp_path):
    """data/make.sh makes the named datasets (valid files), skips those that exist, and
    refuses an unknown name with the names it knows."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    from dbmpi.data import check_file
    env = dict(os.environ, DATA_DIR=str(tmp_path), PYTHON=sys.executable)

    def run(*a):
        return subprocess.run(["bash", str(ROOT / "data" / "make.sh"), *a], env=env,
                              capture_output=True, text=True, timeout=300)

    r = run("--count", "150", "synth32", "digits")
    assert r.returncode == 0, r.stderr
    info = check_file(tmp_path / "synth32.h5", 10, (1, 32, 32))
    assert info["train"] == 150 and info["test"] == 100, info
    assert check_file(tmp_path / "digits.h5", 10, (1, 8, 8))["train"] == 1348
    r = run("--count", "150", "synth32")
    assert r.returncode == 0 and "synth32.h5 exists (150 training images)" in r.stderr
    r = run("synth32")       # a set of another size under the name is pointed out
    assert r.returncode == 0 and "exists (150 training images, not 20000): delete it" in r.stderr
    r = run("mnist")
    assert r.returncode == 2 and "unknown dataset 'mnist'; use digits, synth32, synth64 or all" in r.stderr


def test_errors_are_one_line(tmp_path, digits_path):
    r = run_cli("validate", _cfg(tmp_path, digits_path), "--set", "optimizer.learnig_rate=1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "learning_rate" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("train", _cfg(tmp_path, digits_path), "--set", "data.path=/nonexistent.h5")
    assert r.returncode == 2 and "/nonexistent.h5: dataset file not found" in r.stderr


def test_train_sgd_run_directory_and_evaluate(tmp_path, digits_path):
    out = tmp_path / "run"
    r = run_cli("train", _cfg(tmp_path, digits_path), "--out", out, "--quiet",
                "--set", "run.max_steps=300", "--set", "run.eval_every_s=0.05")
    assert r.returncode == 0, r.stderr
    for f in ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.h5"):
        assert (out / f).exists(), f
    lines = [json.loads(m) for m in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    evals = [m for m in lines if m["kind"] == "eval"]
    assert train and evals and {"replica", "step", "loss"} <= set(train[0])
    assert {"updates", "test_loss", "test_accuracy", "time"} <= set(evals[-1])
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 300 and s["algorithm"] == "sgd" and s["samples_per_s"] > 0
    assert s["final_test_accuracy"] > 0.8
    r = run_cli("evaluate", out)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["accuracy"] == pytest.approx(s["final_test_accuracy"])
    assert ev["counters"]["step"] == 300
    # a resumed run continues from the saved counters
    r = run_cli("train", "--resume", out, "--quiet", "--set", "run.max_steps=400")
    assert r.returncode == 0, r.stderr
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["steps"] == 400


def test_data_commands(tmp_path):
    r = run_cli("data", "synthetic", "--size", "16", "--count", "200", "--out", tmp_path / "s.h5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [1, 16, 16]


def test_digits_sgd_reaches_97_percent(tmp_path, digits_path):
    """Acceptance: jobs/configs/digits_sgd.toml reaches >= 97% within its 60 s budget."""
    out = tmp_path / "run"
    r = run_cli("train", _cfg(tmp_path, digits_path), "--out", out, "--quiet", timeout=150)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["final_test_accuracy"] >= 0.97 and s["wall_time_s"] <= 60


def test_launch_script_bad_config_is_one_clear_line(tmp_path):
    """jobs/launch.sh with a config it cannot read, or a bad --set: validate's one-line error
    and exit code 2, no traceback from the script's own parsing."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, PYTHON=sys.executable)
    for args, msg in [([str(tmp_path / "none.toml")], "config file not found"),
                      ([str(ROOT / "jobs" / "configs" / "digits_sgd.toml"), "--set", "optimizer.learnig_rate=1"],
                       "did you mean 'learning_rate'")]:
        r = subprocess.run(["bash", str(ROOT / "jobs" / "launch.sh"), *args], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_launch_script_passes_only_the_sets_to_validate(tmp_path, digits_path):
    """An --out path holding an "=" is a path, not a --set; --set K=V and --set=K=V are
    both overrides."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, PYTHON=sys.executable)
    out = tmp_path / "lr=0.05"
    r = subprocess.run(["bash", str(ROOT / "jobs" / "launch.sh"),
                        str(ROOT / "jobs" / "configs" / "digits_sgd.toml"), "--out", str(out), "--quiet",
                        "--set", f"data.path={digits_path}", "--set=run.max_steps=30"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 30, s
