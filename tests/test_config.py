"""Tests for twinflow.train.config: defaults, YAML merge, --set overrides and strict key checking."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from twinflow.train.config import DEFAULTS, ConfigError, load_config, total_steps

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load():
    config = load_config()
    assert config == DEFAULTS
    assert config is not DEFAULTS
    config["training"]["batch_size"] = 1  # a deep copy: the defaults stay untouched
    assert DEFAULTS["training"]["batch_size"] == 64


def test_yaml_file_merges_into_defaults(tmp_path):
    path = _write(tmp_path, "seed: 7\ntraining: {batch_size: 16}\nmodel: {channels: [16, 32]}\n")
    config = load_config(path)
    assert config["seed"] == 7
    assert config["training"]["batch_size"] == 16
    # untouched siblings keep their defaults
    assert config["training"]["learning_rate"] == DEFAULTS["training"]["learning_rate"]
    assert config["training"]["optimizer"] == "adamw"
    assert config["model"] == {"name": "unet", "channels": [16, 32]}
    assert config["data"] == DEFAULTS["data"]


def test_set_overrides_nested_keys_with_yaml_typing(tmp_path):
    path = _write(tmp_path, "phases:\n  - {steps: 3, objective: {preset: twinflow}}\n")
    config = load_config(
        path,
        [
            "training.batch_size=32",
            "phases.0.steps=5",
            "phases.0.objective.estimate_order=1",
            "model.channels=[8,16]",
            "training.progress=false",
            "data.limit=64",
        ],
    )
    assert config["training"]["batch_size"] == 32 and type(config["training"]["batch_size"]) is int
    assert config["phases"][0]["steps"] == 5 and type(config["phases"][0]["steps"]) is int
    assert config["phases"][0]["objective"] == {"preset": "twinflow", "estimate_order": 1}
    assert config["model"]["channels"] == [8, 16]
    assert config["training"]["progress"] is False
    assert config["data"]["limit"] == 64
    assert total_steps(config) == 5


def test_later_override_wins_over_file(tmp_path):
    path = _write(tmp_path, "training: {batch_size: 16}\n")
    config = load_config(path, ["training.batch_size=8", "training.batch_size=4"])
    assert config["training"]["batch_size"] == 4


def test_unknown_key_in_file_names_the_dotted_key(tmp_path):
    path = _write(tmp_path, "training: {batch_sise: 16}\n")
    with pytest.raises(ConfigError, match=r"training\.batch_sise"):
        load_config(path)
    path = _write(tmp_path, "sampling: {per_klass: 3}\n", "other.yaml")
    with pytest.raises(ConfigError, match=r"sampling\.per_klass"):
        load_config(path)


def test_unknown_top_level_key_in_file(tmp_path):
    path = _write(tmp_path, "trainng: {batch_size: 16}\n")
    with pytest.raises(ConfigError, match="trainng"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("training.bogus=1", "training.bogus"),
    ("sampling.per_klass=3", "sampling.per_klass"),
    ("nonsense=1", "nonsense"),
    ("data.limit.deeper=1", "data.limit.deeper"),
])
def test_unknown_key_in_override_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value)


def test_bad_list_index_in_override():
    with pytest.raises(ConfigError, match=r"phases\.3"):
        load_config(None, ["phases.3.steps=5"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["training.batch_size"])


def test_unknown_objective_field_is_named():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["phases.0.objective.bogus=1"])
    assert "bogus" in str(error.value)
    assert "phases.0" in str(error.value)


def test_unknown_objective_field_in_file(tmp_path):
    path = _write(tmp_path, "phases:\n  - {steps: 2, objective: {preset: rcgm, estimate_ordr: 1}}\n")
    with pytest.raises(ConfigError, match="estimate_ordr"):
        load_config(path)


def test_unknown_model_field_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.widht"):
        load_config(None, ["model.widht=3"])
    path = _write(tmp_path, "model: {name: unet, chanels: [8, 16]}\n")
    with pytest.raises(ConfigError, match=r"model\.chanels"):
        load_config(path)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="transformer"):
        load_config(None, ["model.name=transformer"])


def test_bad_objective_preset_is_an_error():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["phases.0.objective.preset=nope"])
    assert "nope" in str(error.value)


@pytest.mark.parametrize("override, key", [
    ("training.batch_size=0", "training.batch_size"),
    ("training.optimizer=sgd", "training.optimizer"),
    ("training.ema_decay=1.0", "training.ema_decay"),
    ("precision=fp16", "precision"),
    ("phases.0.steps=0", "phases.0.steps"),
    ("phases=[]", "phases"),
])
def test_invalid_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "training: {batch_size: 16\nseed: [\n", "broken.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_non_mapping_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "- just\n- a list\n", "list.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_config(missing)


def test_there_are_config_files():
    assert CONFIGS, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert total_steps(config) >= 1
    assert set(config) == set(DEFAULTS)  # no stray top-level keys survived validation
    assert config["model"]["name"] in ("unet", "diffusers")  # MNIST U-Nets and text-to-image transformers


def test_numbers_without_a_dot_are_numbers_and_bad_numbers_are_named():
    from twinflow.train.config import ConfigError, load_config

    config = load_config(None, ["training.learning_rate=1e-3"])
    assert config["training"]["learning_rate"] == 1e-3
    with pytest.raises(ConfigError, match="training.learning_rate"):
        load_config(None, ["training.learning_rate=abc"])


def test_phase_learning_rate_is_optional_and_checked():
    from twinflow.train.config import ConfigError, load_config

    config = load_config(None, ["phases=[{steps: 2, learning_rate: 1e-4}, {steps: 3}]"])
    assert config["phases"][0]["learning_rate"] == 1e-4 and "learning_rate" not in config["phases"][1]
    with pytest.raises(ConfigError, match="phases.0.learning_rate"):
        load_config(None, ["phases=[{steps: 2, learning_rate: fast}]"])
    with pytest.raises(ConfigError, match="phases.0"):
        load_config(None, ["phases=[{steps: 2, rate: 1}]"])


TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@pytest.mark.parametrize("override, key", [
    # integers: a type slip or a negative count is named at load time, not as a TypeError in the loop
    ("training.checkpoint_every=abc", "training.checkpoint_every"),
    ("training.checkpoint_every=-1", "training.checkpoint_every"),
    ("training.warmup_steps=abc", "training.warmup_steps"),
    ("training.sample_every=1.5", "training.sample_every"),
    ("training.log_every=0", "training.log_every"),
    ("training.grad_accumulation=true", "training.grad_accumulation"),  # a bool is not an integer
    ("training.keep_checkpoints=0", "training.keep_checkpoints"),
    ("seed=abc", "seed"),
    ("seed=-1", "seed"),
    ("phases.1.steps=two", "phases.1.steps"),
    # numbers and ranges
    ("training.learning_rate=0", "training.learning_rate"),
    ("training.weight_decay=-0.1", "training.weight_decay"),
    ("training.grad_clip=nan", "training.grad_clip"),
    ("training.ema_decay=abc", "training.ema_decay"),
    ("training.betas=[0.9]", "training.betas"),
    ("training.betas=[0.9, 1.0]", "training.betas"),
    ("phases=[{steps: 2, learning_rate: -1}]", "phases.0.learning_rate"),
    # booleans, choices, strings
    ("training.tensorboard=yes please", "training.tensorboard"),
    ("training.progress=1", "training.progress"),
    ("training.init_from=5", "training.init_from"),
    ("device=tpu", "device"),
    ("device=cuda:x", "device"),
    ("data.channels=2", "data.channels"),
    ("data.limit=0", "data.limit"),
    ("data.split=val", "data.split"),
    ("data.source=imagenet", "data.source"),
    ("distributed.find_unused_parameters=no thanks", "distributed.find_unused_parameters"),
    ("training=5", "training"),
    # sampling: presets through the sampler's own parser
    ("sampling.presets=[1nfee]", "sampling.presets"),
    ("sampling.presets=[multi:steps=0]", "sampling.presets"),
    ("sampling.presets=5", "sampling.presets"),
    ("sampling.per_class=abc", "sampling.per_class"),
    ("sampling.seed=0.5", "sampling.seed"),
    ("sampling.use_ema=1", "sampling.use_ema"),
    # the model's fields, typed by its config dataclass
    ("model.channels=abc", "model.channels"),
    ("model.channels=[16, 0]", "model.channels"),
    ("model.embedding_dim=wide", "model.embedding_dim"),
    ("model.patch_size=0", "model.patch_size"),
    ("model.attention_heads=-1", "model.attention_heads"),
    # the objective: ObjectiveConfig's ranges, named with the phase
    ("phases.1.objective.consistency_ratio=2", "phases.1.objective.consistency_ratio"),
    ("phases.1.objective.residual_clamp=0", "phases.1.objective.residual_clamp"),
    ("phases.1.objective.estimate_order=true", "phases.1.objective.estimate_order"),
    ("phases.1.objective.multi_step_max_gap=-0.5", "phases.1.objective.multi_step_max_gap"),
    ("phases.1.objective.barron_constant=0", "phases.1.objective.barron_constant"),
    ("phases.1.objective.time_weighting=maybe", "phases.1.objective.time_weighting"),
    ("phases.1.objective.time_distribution=abc", "phases.1.objective.time_distribution"),
    ("phases.1.objective=twinflow", "phases.1.objective"),
    ("phases.1.objective.preset=nope", "phases.1.objective.preset"),
    # rules between keys
    ("training.gradient_checkpointing=true", "training.gradient_checkpointing"),
    ("training.lora={rank: 4}", "training.lora"),
    ("training.unconditional_label=shuffled", "training.unconditional_label"),
])
def test_every_rule_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(TINY, [override])


@pytest.mark.parametrize("overrides, key", [
    (["model.family=qwen"], "model.family"),
    (["model.dtype=fp16"], "model.dtype"),
    (["model.single_time_embedding=1"], "model.single_time_embedding"),
    (["model.path=null"], "model.path"),
    (["model.dtype=bf16", "training.lora=null"], "model.dtype"),  # bf16 weights are for a frozen base
    (["model.dtype=bf16", "precision=fp32"], "model.dtype"),
    (["model.single_time_embedding=true"], "train_second_embedding"),  # the lora trains emb_2
])
def test_diffusers_model_fields_and_cross_rules_are_named(overrides, key):
    path = TINY.parent / "qwen_image_twinflow.yaml"
    load_config(path)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(path, overrides)


def test_valid_edge_values_still_load():
    config = load_config(TINY, [
        "training.checkpoint_every=0", "training.warmup_steps=0", "training.sample_every=0", "training.grad_clip=0",
        "training.ema_decay=0", "training.weight_decay=0", "training.betas=[0, 0.999]", "seed=0", "device=cuda:1",
        "phases.1.objective.consistency_ratio=1", "phases.1.objective.multi_step_max_gap=0",
        "phases.1.objective.barron_constant=1e-3", "sampling.presets=[multi:steps=50, '4nfe:gaps=[0.001,0.4]']",
        "model.attention_heads=0", "training.init_from=runs/old",
    ])
    assert config["training"]["checkpoint_every"] == 0 and config["training"]["warmup_steps"] == 0
    assert config["sampling"]["presets"] == ["multi:steps=50", "4nfe:gaps=[0.001,0.4]"]
    assert config["phases"][1]["objective"]["consistency_ratio"] == 1


def test_values_are_normalised_for_the_run():
    config = load_config(TINY, ["training.learning_rate=2e-4", "training.betas=['9e-1', 0.99]", "sampling.presets=1nfe,2nfe"])
    assert config["training"]["learning_rate"] == 2e-4  # YAML reads 2e-4 as a string
    assert config["training"]["betas"] == [0.9, 0.99]
    assert config["sampling"]["presets"] == ["1nfe", "2nfe"]


def test_a_section_given_whole_keeps_its_defaults_and_checks_its_keys():
    config = load_config(None, ["training={batch_size: 3}"])
    assert config["training"]["batch_size"] == 3
    assert config["training"]["learning_rate"] == DEFAULTS["training"]["learning_rate"]
    with pytest.raises(ConfigError, match=r"training\.batch_sise"):
        load_config(None, ["training={batch_sise: 3}"])


def test_every_default_key_has_a_rule():
    from twinflow.train.config import RULES

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert set(RULES) == set(leaves(DEFAULTS)) - {"model.name", "phases"}  # those two: _validate_model, phase_objective


def test_other_class_unconditional_labels_need_class_labels():
    with pytest.raises(ConfigError, match=r"training\.unconditional_label=other_class needs class labels"):
        load_config(TINY, ["data.source=latent_cache", "data.root=cache", "data.limit=null", "training.unconditional_label=other_class"])
    assert load_config(TINY, ["training.unconditional_label=other_class"])["training"]["unconditional_label"] == "other_class"
