"""Settings checked up front: a bad value is refused before data loads or anything trains."""

import importlib.util
import re
from pathlib import Path

import pytest

from selfcleanse_jax import settings, train
from selfcleanse_jax.config import default_config
from selfcleanse_jax.demo import demo_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_shipped_configs_pass(path):
    settings.check(_load(path))


def test_the_default_and_demo_configs_pass():
    for config in (default_config(), demo_config(quick=True), demo_config(quick=False)):
        settings.check(config)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("cleanse.kappa", 1.5, "cleanse.kappa must be a number in [0, 1], got 1.5"),
        ("cleanse.tau", 0.0, "cleanse.tau must be a number in (0, 1), got 0.0"),
        ("cleanse.fallback", "nearest", "cleanse.fallback must be one of given, ignore, disputed"),
        ("train.epochs", 2.5, "train.epochs must be an integer >= 1, got 2.5"),
        ("train.learning_rate", 0.0, "train.learning_rate must be a number > 0"),
        ("model.norm", "layer", "model.norm must be one of instance, group, batch"),
        ("cleanse.teacher_decay", 1.0, "cleanse.teacher_decay must be a number in [0, 1)"),
        ("noise.kind", "dilate", "unknown noise kind 'dilate'"),
        ("noise.rate", 1.5, "noise.rate must be a number <= 1"),
        ("method", True, "method must be one of baseline"),
    ],
)
def test_a_bad_value_is_named_with_what_it_may_be(key, value, said):
    config = default_config()
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ValueError, match=re.escape(said)):
        settings.check(config)


def test_every_problem_is_named_at_once():
    config = default_config()
    config.cleanse.kappa = -1.0
    config.train.batch_size = 0
    with pytest.raises(ValueError, match=r"train.batch_size .*; cleanse.kappa"):
        settings.check(config)


def test_a_bad_kappa_is_refused_before_the_data_loads_or_a_folder_is_made(tmp_path):
    config = default_config()
    config.data.root = str(tmp_path / "no_such_dataset")  # loading it would fail
    config.cleanse.kappa = 2.0
    with pytest.raises(ValueError, match="cleanse.kappa"):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="cleanse.kappa"):
        train.Trainer(config, tmp_path / "run")
