from dataclasses import dataclass

import pytest

from genlab.api import RunConfig, resolve_config
from genlab.core.config import apply_overrides, from_dict, parse_value, to_dict
from genlab.core.errors import ConfigError
from genlab.core.registry import Registry
from genlab.training.trainer import TrainConfig


@dataclass
class Inner:
    a: int = 1
    b: float = 0.5
    flag: bool = False
    names: tuple[str, ...] = ()


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key train\.lrr; allowed keys under train: .*lr"):
        from_dict(RunConfig, {"train": {"lrr": 1}})


@pytest.mark.parametrize("d,msg", [
    ({"a": "3"}, "a: expected an integer"),
    ({"a": 1.5}, "a: expected an integer"),
    ({"a": True}, "a: expected an integer"),
    ({"b": "x"}, "b: expected a number"),
    ({"flag": 1}, "flag: expected true or false"),
    ({"names": "abc"}, "names: expected a list"),
])
def test_wrong_types_are_errors(d, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(Inner, d)


def test_int_is_accepted_for_float_and_lists_become_tuples():
    x = from_dict(Inner, {"b": 2, "names": ["p", "q"]})
    assert x.b == 2.0 and isinstance(x.b, float) and x.names == ("p", "q")
    assert to_dict(x) == {"a": 1, "b": 2.0, "flag": False, "names": ["p", "q"]}


def test_overrides_parse_toml_values():
    d = apply_overrides({}, ["train.lr=3e-4", "train.precision=bf16", "model.bias=false", "data.path='a b'",
                             "x.y.z=[1, 2]"])
    assert d == {"train": {"lr": 3e-4, "precision": "bf16"}, "model": {"bias": False}, "data": {"path": "a b"},
                 "x": {"y": {"z": [1, 2]}}}
    assert parse_value("12") == 12 and parse_value("hello") == "hello"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_resolve_config_checks_values_and_model_section(tmp_path):
    rc = resolve_config(base={"model": {"family": "gpt", "preset": "baby"}}, overrides=["train.lr=0.01"])
    assert rc.train.lr == 0.01 and rc.run_dir.name == "run"
    with pytest.raises(ConfigError, match="model.n_layerz"):
        resolve_config(base={"model": {"family": "gpt", "n_layerz": 2}})
    with pytest.raises(ConfigError, match="train.lr=-1.0 must be in"):
        resolve_config(base={}, overrides=["train.lr=-1"])
    with pytest.raises(ConfigError, match="set a budget"):
        from_dict(TrainConfig, {"max_steps": 0})
    with pytest.raises(ConfigError, match="divisible"):
        resolve_config(base={"model": {"family": "gpt", "n_embd": 30, "n_head": 4}})


def test_registry_lists_known_names():
    r = Registry("sampler")
    r.register("ddim")(object)
    with pytest.raises(ConfigError, match="unknown sampler 'euler'; known: ddim"):
        r.get("euler")
    with pytest.raises(ValueError):
        r.register("ddim")(object)
