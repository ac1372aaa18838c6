"""Configuration mistakes fail when the recipe is loaded, before any model is built, naming the key and the fix;
the CLI prints the resolved recipe (``--print-config``) and its version (``--version``)."""

import importlib.metadata
import re

import pytest
import yaml

from dinov2_hf.config_utils import ConfigError, to_dict
from dinov2_hf.curate.config import EmbedSettings, load_curate_config
from dinov2_hf.objective.config import ModelSettings, available_recipes
from dinov2_hf.objective.meta_arch import build_student_config
from dinov2_hf.training.config import load_train_config


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to build the Trainer (and so a model) fails the test."""
    import dinov2_hf.training.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("the Trainer was built")

    monkeypatch.setattr(trainer_module, "Trainer", refuse)


# -- model.overrides / embed.overrides ----------------------------------------------------------------------


def test_a_misspelt_model_override_is_refused_at_load():
    # The spelt-right key changes the depth; the misspelt one used to be kept as a stray config attribute,
    # so the preset's 12 blocks trained without a word.
    assert build_student_config(load_train_config("quickstart", ["model.overrides.num_hidden_layers=2"])).num_hidden_layers == 2
    with pytest.raises(ConfigError) as error:
        load_train_config("quickstart", ["model.overrides.num_hiden_layers=2"])
    message = str(error.value)
    assert "model.overrides.num_hiden_layers (did you mean model.overrides.num_hidden_layers?)" in message
    assert "Valid fields of model.overrides:" in message and "pos_embed_interpolation" in message
    with pytest.raises(ValueError, match="model.overrides.depth"):
        ModelSettings(preset="tiny", overrides={"depth": 2})


def test_every_shipped_recipe_has_valid_model_overrides():
    for recipe in available_recipes():
        load_train_config(recipe)


def test_a_misspelt_embed_override_is_refused_at_load():
    with pytest.raises(ConfigError, match=re.escape("embed.overrides.layerscale (did you mean embed.overrides.layerscale_value?)")):
        load_curate_config(None, ["pool.source=images/", "embed.overrides.layerscale=1.0"])
    with pytest.raises(ConfigError, match="embed.overrides must be a mapping"):
        load_curate_config(None, ["pool.source=images/", "embed.overrides=3"])
    assert EmbedSettings(preset="tiny", overrides={"layerscale_value": 1.0}).overrides == {"layerscale_value": 1.0}


# -- train settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("save_every", 0),  # was a ZeroDivisionError after the first step
    ("keep_last", 0),  # was an error once the first checkpoint had been written
    ("batch_size_per_device", 0),  # was torch's DataLoader message
    ("num_workers", -1),  # was torch's DataLoader message
    ("log_every", 0),  # was a ZeroDivisionError after the first step
    ("gradient_accumulation_steps", 0),  # was refused only when the Trainer was built
    ("max_steps", 0),
    ("max_steps", -1),
])
def test_train_settings_out_of_range_are_refused_at_load(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"train.{key}={value} must be")):
        load_train_config("quickstart", [f"train.{key}={value}"])


def test_train_settings_at_their_lowest_valid_values_load():
    config = load_train_config("quickstart", ["train.save_every=1", "train.keep_last=1", "train.batch_size_per_device=1",
                                              "train.num_workers=0", "train.log_every=1", "train.gradient_accumulation_steps=1"])
    assert config.train.keep_last == 1 and config.train.num_workers == 0


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_the_cli_reports_a_config_mistake_without_a_traceback(capsys, no_training):
    from dinov2_hf.cli import main

    assert main(["train", "--config", "quickstart", "model.overrides.num_hiden_layers=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinov2-hf train: error: ") and "model.overrides.num_hidden_layers?" in err
    assert "Traceback" not in err


def test_print_config_prints_the_resolved_recipe_and_builds_nothing(tmp_path, capsys, no_training):
    from dinov2_hf.cli import main

    assert main(["train", "--config", "quickstart", "--print-config", "model.overrides.num_hidden_layers=2",
                 "train.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert list(data)[:2] == ["model", "dino"]  # the recipe's order, not sorted
    assert data["model"]["overrides"]["num_hidden_layers"] == 2 and data["train"]["max_steps"] == 7
    # The printed recipe is itself a recipe that loads to the same config.
    (tmp_path / "printed.yaml").write_text(printed)
    assert to_dict(load_train_config(tmp_path / "printed.yaml")) == data


def test_distill_takes_overrides_before_and_after_teacher(capsys, no_training):
    from dinov2_hf.cli import main

    assert main(["distill", "--config", "distill_quickstart", "--teacher", "runs/t/checkpoints/checkpoint-6",
                 "train.max_steps=3", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["distill"]["teacher"] == "runs/t/checkpoints/checkpoint-6" and data["train"]["max_steps"] == 3
    # Overrides on both sides of an option: argparse alone fills the positional from the first run only.
    assert main(["distill", "train.max_steps=3", "--teacher", "t", "--print-config", "train.seed=5", "train.seed=6"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert (data["train"]["max_steps"], data["train"]["seed"], data["distill"]["teacher"]) == (3, 6, "t")
    with pytest.raises(SystemExit) as exit_:  # a misspelt option is still an argparse error
        main(["distill", "--teacher", "t", "--print-confg", "train.seed=5"])
    assert exit_.value.code == 2 and "unrecognized arguments: --print-confg" in capsys.readouterr().err


def test_version_flag(capsys):
    from dinov2_hf.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"dinov2-hf {importlib.metadata.version('dinov2-hf')}\n"
