"""Configuration: TOML files, ``--set`` overrides, defaults and validation.

A config has the tables ``data``, ``model``, ``cluster``, ``optimizer``, ``run`` and
``faults``.  :func:`load` reads a file, applies overrides, fills defaults and checks every
key and value, raising :class:`ConfigError` with a message that names the file, the key and
what is allowed; it returns a :class:`Config` of typed sections (``cfg.optimizer.batch_size``),
made once, so each component receives the sections it uses.  Nothing here needs MPI.
"""

from __future__ import annotations

import copy
import difflib
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .algorithms import ALGORITHMS

__all__ = ["ConfigError", "Config", "DataConfig", "ClusterConfig", "OptimizerConfig",
           "RunConfig", "FaultsConfig", "DEFAULTS", "LAYER_KEYS", "load", "parse",
           "apply_override", "ranks_needed", "dumps"]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says how to fix it."""



def _key(default, kind):
    """A config key: its default and its kind (a type, a tuple of allowed strings, or a
    (type, minimum) pair for numbers that must be at least the minimum)."""
    return field(default=default, metadata={"kind": kind})


@dataclass(frozen=True)
class DataConfig:
    path: str = _key("data/digits.h5", str)
    cache_mb: float = _key(1024.0, (float, 0.0))


@dataclass(frozen=True)
class ClusterConfig:
    ps_shards: int = _key(1, (int, 1))
    replicas: int = _key(1, (int, 1))
    partitions: int = _key(1, (int, 1))
    ps_progress: str = _key("auto", ("auto", "passive", "attended"))


@dataclass(frozen=True)
class OptimizerConfig:
    algorithm: str = _key("sgd", tuple(ALGORITHMS))
    learning_rate: float = _key(0.05, (float, 0.0))
    adagrad: bool = _key(False, bool)
    adagrad_eps: float = _key(1e-8, (float, 0.0))
    direct_push: bool = _key(True, bool)
    batch_size: int = _key(32, (int, 1))
    n_fetch: int = _key(1, (int, 1))
    n_push: int = _key(1, (int, 1))
    warmstart_steps: int = _key(0, (int, 0))
    seed: int = _key(0, (int, 0))
    lbfgs_history: int = _key(10, (int, 1))
    portion_size: int = _key(64, (int, 1))
    push_every: int = _key(1, (int, 0))
    batch_fraction: float = _key(1.0, (float, 0.0))
    backups: bool = _key(True, bool)
    balance: bool = _key(True, bool)
    max_line_search: int = _key(20, (int, 1))


@dataclass(frozen=True)
class RunConfig:
    max_steps: int = _key(2000, (int, 1))
    max_time_s: float = _key(600.0, (float, 0.0))
    target_accuracy: float = _key(0.0, (float, 0.0))
    eval_every_s: float = _key(2.0, (float, 0.0))
    checkpoint_every_s: float = _key(60.0, (float, 0.0))
    log_every: int = _key(10, (int, 1))


@dataclass(frozen=True)
class FaultsConfig:
    slow_replica: int = _key(-1, (int, -1))
    slow_factor: float = _key(1.0, (float, 1.0))
    fail_rank: int = _key(-1, (int, -1))
    fail_after_s: float = _key(0.0, (float, 0.0))


@dataclass(frozen=True)
class Config:
    """A resolved config, made once by :func:`load` (or :func:`parse`): one typed section a
    table, so a component takes the sections it uses.  ``model`` is the network's spec, the
    dict :func:`dbmpi.model.build` takes."""
    data: DataConfig
    model: dict
    cluster: ClusterConfig
    optimizer: OptimizerConfig
    run: RunConfig
    faults: FaultsConfig

    def as_dict(self) -> dict:
        """The tables as a nested dict (what config.toml holds)."""
        return {t: (copy.deepcopy(self.model) if t == "model" else asdict(getattr(self, t)))
                for t in TABLES}


_SECTIONS = {"data": DataConfig, "cluster": ClusterConfig, "optimizer": OptimizerConfig,
             "run": RunConfig, "faults": FaultsConfig}
TABLES = ("data", "model", "cluster", "optimizer", "run", "faults")

# table -> key -> (default, kind), from the sections above (and the [model] table's keys)
DEFAULTS: dict[str, dict[str, tuple]] = {
    t: ({"input_shape": (None, list), "l2": (0.0, (float, 0.0)), "layers": (None, list)}
        if t == "model" else
        {f.name: (f.default, f.metadata["kind"]) for f in fields(_SECTIONS[t])})
    for t in TABLES}

# Keys each layer type takes: key -> (default, kind); a default of None means required.
_ACT = ("relu", "sigmoid", "tanh", "linear")
LAYER_KEYS: dict[str, dict[str, tuple]] = {
    "locally_connected": {"channels": (None, (int, 1)), "kernel": (None, (int, 1)),
                          "stride": (1, (int, 1)), "padding": (0, (int, 0)),
                          "activation": ("relu", _ACT)},
    "fully_connected": {"units": (None, (int, 1)), "activation": ("relu", _ACT)},
    "max_pool": {"size": (2, (int, 1)), "stride": (None, (int, 1))},
    "l2_pool": {"size": (2, (int, 1)), "stride": (None, (int, 1))},
    "lcn": {"size": (5, (int, 1)), "eps": (1e-2, (float, 0.0))},
    "softmax": {"classes": (None, (int, 2)), "split": ("auto", ("auto", "units", "inputs"))},
}


def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}'" if source else f"key '{key}'"


def _check_value(value, kind, source: str, key: str):
    """Return ``value`` converted to ``kind`` or raise ConfigError naming the key."""
    where = _where(source, key)
    if isinstance(kind, tuple) and kind and isinstance(kind[0], str):
        if value not in kind:
            raise ConfigError(f"{where} = {value!r} is not allowed; use one of {', '.join(kind)}")
        return value
    minimum = None
    if isinstance(kind, tuple):
        kind, minimum = kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where} = {value!r} must be an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be finite")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} must be a string")
    elif kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} must be a list")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} = {value!r} must be at least {minimum}")
    return value


def _unknown(key: str, allowed, source: str, what: str = "key") -> ConfigError:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(allowed), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return ConfigError(f"{source + ': ' if source else ''}unknown {what} '{key}'{hint}; "
                       f"allowed: {', '.join(sorted(allowed))}")


def _check_layers(layers, source: str) -> list[dict]:
    if not layers:
        raise ConfigError(f"{_where(source, 'model.layers')} is missing: add at least one "
                          "[[model.layers]] table, the last one of type \"softmax\"")
    out = []
    for i, layer in enumerate(layers):
        name = f"model.layers[{i}]"
        if not isinstance(layer, dict):
            raise ConfigError(f"{_where(source, name)} must be a table")
        kind = layer.get("type")
        if kind not in LAYER_KEYS:
            raise ConfigError(f"{_where(source, name + '.type')} = {kind!r} is not a layer "
                              f"type; use one of {', '.join(LAYER_KEYS)}")
        keys = LAYER_KEYS[kind]
        checked = {"type": kind}
        for k, v in layer.items():
            if k == "type":
                continue
            if k not in keys:
                raise _unknown(f"{name}.{k}", list(keys) + ["type"], source)
            checked[k] = _check_value(v, keys[k][1], source, f"{name}.{k}")
        for k, (default, kind_) in keys.items():
            if k not in checked:
                if default is None and not (k == "stride" and "size" in keys):
                    raise ConfigError(f"{_where(source, name + '.' + k)} is required for a "
                                      f"{kind} layer")
                checked[k] = default
        if "size" in keys and checked.get("stride") is None and kind != "lcn":
            checked["stride"] = checked["size"]
        if kind == "lcn" and checked["size"] % 2 == 0:
            raise ConfigError(f"{_where(source, name + '.size')} = {checked['size']} must be odd "
                              "(the window is centred on each pixel)")
        out.append(checked)
    if out[-1]["type"] != "softmax":
        raise ConfigError(f"{_where(source, 'model.layers')}: the last layer must be of type "
                          f"\"softmax\", not {out[-1]['type']!r}")
    for i, layer in enumerate(out[:-1]):
        if layer["type"] == "softmax":
            raise ConfigError(f"{_where(source, f'model.layers[{i}]')}: softmax may only be the "
                              "last layer")
    return out


def check_model(model: dict, source: str = "") -> dict:
    """Validate a [model] table; returns a new dict with defaults filled."""
    if not isinstance(model, dict):
        raise ConfigError(f"{source + ': ' if source else ''}[model] must be a table")
    for k in model:
        if k not in DEFAULTS["model"]:
            raise _unknown(f"model.{k}", DEFAULTS["model"], source)
    shape = model.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ConfigError(f"{_where(source, 'model.input_shape')} = {shape!r} must be three "
                          "positive integers [channels, height, width]")
    return {"input_shape": list(shape),
            "l2": _check_value(model.get("l2", 0.0), (float, 0.0), source, "model.l2"),
            "layers": _check_layers(model.get("layers"), source)}


def parse(raw: dict, source: str = "") -> Config:
    """Validate a raw config dict and fill defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a TOML document of tables")
    for table in raw:
        if table not in DEFAULTS:
            raise _unknown(table, DEFAULTS, source, "table")
    cfg: dict = {}
    for table, keys in DEFAULTS.items():
        given = raw.get(table, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{_where(source, table)} must be a table [{table}]")
        if table == "model":
            if "model" not in raw:
                raise ConfigError(f"{source + ': ' if source else ''}the [model] table is "
                                  "missing; see jobs/configs/digits_sgd.toml for an example")
            cfg["model"] = check_model(given, source)
            continue
        out = {}
        for k, v in given.items():
            if k not in keys:
                raise _unknown(f"{table}.{k}", keys, source)
            out[k] = _check_value(v, keys[k][1], source, f"{table}.{k}")
        for k, (default, _) in keys.items():
            out.setdefault(k, default)
        cfg[table] = out
    cfg = Config(model=cfg.pop("model"), **{t: _SECTIONS[t](**v) for t, v in cfg.items()})
    c, o = cfg.cluster, cfg.optimizer
    if ALGORITHMS[o.algorithm].one_replica and c.replicas != 1:
        raise ConfigError(f"{_where(source, 'cluster.replicas')} = {c.replicas}: algorithm "
                          f"\"{o.algorithm}\" trains one replica; set replicas = 1 or use "
                          "\"downpour\"")
    if cfg.faults.slow_replica >= c.replicas:
        raise ConfigError(f"{_where(source, 'faults.slow_replica')} = "
                          f"{cfg.faults.slow_replica} but there are only {c.replicas} "
                          "replicas (numbered from 0; -1 turns the straggler off)")
    return cfg


def _parse_scalar(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is taken as a string


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``KEY=VALUE`` override (``optimizer.learning_rate=0.1``) to a raw config."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, for example "
                          "--set optimizer.learning_rate=0.1")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set {key}: name the table too, for example optimizer.{key}")
    if parts[0] not in DEFAULTS:
        raise _unknown(parts[0], DEFAULTS, "--set", "table")
    if parts[0] != "model" and (len(parts) != 2 or parts[1] not in DEFAULTS[parts[0]]):
        raise _unknown(key, DEFAULTS[parts[0]], "--set")
    node = raw
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
    value = _parse_scalar(text.strip())
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def load(path, overrides=()) -> Config:
    """Read a TOML config file, apply ``KEY=VALUE`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    _include_model(raw, path)
    for o in overrides:
        apply_override(raw, o)
    return parse(raw, str(path))


def _include_model(raw: dict, path: Path) -> None:
    """``[model] file = "NETWORK.toml"``: the network's ``[model]`` table from that file
    (a path relative to the config's directory), the keys given beside ``file`` over it;
    so configs share one definition of a network.  The resolved table is what a run
    directory's config.toml holds."""
    model = raw.get("model")
    if not isinstance(model, dict) or "file" not in model:
        return
    given = dict(model)
    name = given.pop("file")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: model.file must be a path to a TOML file; got {name!r}")
    net_path = path.parent / name
    try:
        shared = tomllib.loads(net_path.read_text()).get("model")
    except FileNotFoundError:
        raise ConfigError(f"{path}: model.file: {net_path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: model.file: {net_path} is not valid TOML ({e})") from None
    if not isinstance(shared, dict) or "file" in shared:
        raise ConfigError(f"{path}: model.file: {net_path} must hold a [model] table "
                          "(without a file key of its own)")
    raw["model"] = {**shared, **given}


def ranks_needed(cfg: Config) -> int:
    """World size the config needs: see README, "Roles and ranks"."""
    from .topology import shards_of
    c, S = cfg.cluster, shards_of(cfg)
    return (1 + S if S else 0) + c.replicas * c.partitions


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(cfg: Config) -> str:
    """Write a resolved config (tables of scalars and lists, model.layers) as TOML."""
    lines = []
    for table, keys in cfg.as_dict().items():
        lines.append(f"[{table}]")
        for k, v in keys.items():
            if table == "model" and k == "layers":
                continue
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        if table == "model":
            for layer in keys["layers"]:
                lines.append("[[model.layers]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in layer.items() if v is not None]
        lines.append("")
    return "\n".join(lines)

