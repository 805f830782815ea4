import pytest

from dbmpi.config import ConfigError, apply_override, dumps, load, parse, ranks_needed

MODEL = {"input_shape": [1, 8, 8], "layers": [{"type": "softmax", "classes": 10}]}


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_ranks():
    cfg = parse({"model": MODEL})
    assert cfg.optimizer.algorithm == "sgd" and ranks_needed(cfg) == 1
    cfg = parse({"model": MODEL, "optimizer": {"algorithm": "downpour"},
                 "cluster": {"ps_shards": 2, "replicas": 3, "partitions": 2}})
    assert ranks_needed(cfg) == 1 + 2 + 6
    cfg = parse({"model": MODEL, "optimizer": {"algorithm": "sync"}, "cluster": {"replicas": 4}})
    assert ranks_needed(cfg) == 4


@pytest.mark.parametrize("raw,match", [
    ({"model": MODEL, "optimizer": {"learnig_rate": 0.1}}, "unknown key 'optimizer.learnig_rate'.*learning_rate"),
    ({"model": MODEL, "optimiser": {}}, "unknown table 'optimiser'.*optimizer"),
    ({"model": MODEL, "optimizer": {"learning_rate": "fast"}}, "optimizer.learning_rate.*must be a number"),
    ({"model": MODEL, "optimizer": {"learning_rate": -1}}, "at least 0"),
    ({"model": MODEL, "optimizer": {"algorithm": "adam"}}, "sgd, downpour, sandblaster, sync"),
    ({"model": MODEL, "cluster": {"replicas": 2}}, "algorithm \"sgd\" trains one replica"),
    ({"model": {"input_shape": [8, 8], "layers": []}}, "input_shape"),
    ({"model": {"input_shape": [1, 8, 8], "layers": [{"type": "conv"}]}}, r"layers\[0\].type.*locally_connected"),
    ({"model": {"input_shape": [1, 8, 8], "layers": [{"type": "fully_connected", "units": 3}]}}, "last layer must be"),
    ({"model": {"input_shape": [1, 8, 8], "layers": [{"type": "locally_connected", "kernel": 3}, {"type": "softmax", "classes": 2}]}}, r"layers\[0\].channels' is required"),
    ({"model": {"input_shape": [1, 8, 8], "layers": [{"type": "softmax", "classes": 2, "units": 3}]}}, r"unknown key 'model.layers\[0\].units'"),
    ({"model": {"input_shape": [1, 8, 8], "layers": [{"type": "softmax", "classes": 2, "split": "rows"}]}}, r"model.layers\[0\].split' = 'rows' is not allowed; use one of auto, units, inputs"),
    ({}, "\\[model\\] table is missing"),
])
def test_bad_config(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse(raw, "x.toml")


def test_load_with_overrides_and_roundtrip(tmp_path):
    p = write(tmp_path, '[model]\ninput_shape = [1, 8, 8]\n[[model.layers]]\ntype = "softmax"\nclasses = 10\n')
    cfg = load(p, ["optimizer.learning_rate=0.2", "optimizer.adagrad=true", "run.max_steps=5",
                   "model.l2=0.01", "data.path=foo.h5"])
    assert cfg.optimizer.learning_rate == 0.2 and cfg.optimizer.adagrad is True
    assert cfg.run.max_steps == 5 and cfg.model["l2"] == 0.01
    assert cfg.data.path == "foo.h5"
    again = write(tmp_path, dumps(cfg))
    assert load(again) == cfg


def test_override_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "optimizer.learning_rate")
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lr'"):
        apply_override({}, "optimizer.lr=1")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[model\n"))


def test_every_job_config_is_valid():
    from pathlib import Path

    from dbmpi.model import build
    for path in sorted((Path(__file__).parents[1] / "jobs").glob("*.toml")):
        cfg = load(path)
        assert build(cfg.model).num_params > 0, path
        assert ranks_needed(cfg) >= 1


def test_a_config_includes_its_network_from_a_file(tmp_path):
    """``[model] file``: the network's table from a file beside the config, keys given
    beside ``file`` over it; the resolved table is what a run directory keeps."""
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "net.toml").write_text(
        '[model]\ninput_shape = [1, 8, 8]\nl2 = 0.5\n[[model.layers]]\ntype = "softmax"\n'
        'classes = 10\n')
    (tmp_path / "cfgs").mkdir()
    cfg_path = tmp_path / "cfgs" / "c.toml"
    cfg_path.write_text('[model]\nfile = "../nets/net.toml"\nl2 = 0.001\n')
    cfg = load(cfg_path)
    assert cfg.model["l2"] == 0.001 and cfg.model["input_shape"] == [1, 8, 8]
    assert "file" not in cfg.model and "file" not in dumps(cfg)
    assert load(cfg_path, ["model.l2=0.25"]).model["l2"] == 0.25   # --set still applies
    cfg_path.write_text('[model]\nfile = "../nets/missing.toml"\n')
    with pytest.raises(ConfigError, match="c.toml: model.file: .*missing.toml not found"):
        load(cfg_path)


def test_the_jobs_configs_share_their_networks():
    from conftest import ROOT
    configs = sorted((ROOT / "jobs" / "configs").glob("*.toml"))
    assert len(configs) >= 5
    digits = [load(p).model for p in configs if p.stem in ("digits_sgd", "digits_downpour")]
    assert digits[0] == digits[1] == load(ROOT / "jobs" / "networks" / "digits.toml").model


def test_the_readme_documents_every_config_key():
    """The README's config reference names every key a config may hold."""
    from conftest import ROOT
    from dbmpi.config import DEFAULTS
    readme = (ROOT / "README.md").read_text()
    ref = readme[readme.index("## Config"):readme.index("## Algorithms")]
    missing = [f"{t}.{k}" for t, keys in DEFAULTS.items() for k in keys
               if f"`{k}`" not in ref and f"`{t}.{k}`" not in ref]
    assert not missing, missing
