from __future__ import annotations

import json

import pytest
import yaml

from lm import ConfigError, ModelConfig


def custom_config() -> ModelConfig:
    # every field away from its default, so a round trip that drops a field is caught
    return ModelConfig(vocab_size=77, block_size=33, n_layer=3, n_head=2, d_model=24, d_ff=50, dropout=0.25,
                       bias=False, tie_weights=False, attention="manual", init="xavier_uniform", norm_eps=1e-6)


def test_custom_config_differs_from_default_in_every_field():
    default, custom = ModelConfig().to_dict(), custom_config().to_dict()
    assert [k for k in default if default[k] == custom[k]] == []


def test_dict_round_trip():
    config = custom_config()
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_json_round_trip():
    config = custom_config()
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert ModelConfig.from_json(text) == config


def test_yaml_round_trip():
    config = custom_config()
    text = config.to_yaml()
    assert yaml.safe_load(text) == config.to_dict()
    assert ModelConfig.from_yaml(text) == config


def test_d_ff_none_round_trips_and_means_four_times_d_model():
    config = ModelConfig(d_model=64, n_head=4)
    assert config.d_ff is None and config.ffn_width == 256
    assert ModelConfig.from_yaml(config.to_yaml()).d_ff is None
    assert ModelConfig(d_model=64, n_head=4, d_ff=100).ffn_width == 100


@pytest.mark.parametrize("suffix, parse", [(".json", json.loads), (".yaml", yaml.safe_load), (".yml", yaml.safe_load)])
def test_save_load_round_trip(tmp_path, suffix, parse):
    config = custom_config()
    path = tmp_path / f"model{suffix}"
    config.save(path)
    assert parse(path.read_text()) == config.to_dict()  # the suffix picked the format
    assert ModelConfig.load(path) == config


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\.json, \.yaml or \.yml"):
        ModelConfig().save(tmp_path / "model.toml")
    (tmp_path / "model.txt").write_text("{}")
    with pytest.raises(ConfigError, match="model.txt"):
        ModelConfig.load(tmp_path / "model.txt")


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.load(tmp_path / "nope.yaml")


def test_unknown_field_is_named():
    data = ModelConfig().to_dict() | {"n_embd": 64}
    with pytest.raises(ConfigError, match="n_embd"):
        ModelConfig.from_dict(data)


def test_from_dict_needs_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        ModelConfig.from_yaml("- 1\n- 2\n")


def test_d_model_not_divisible_by_n_head_names_both_numbers():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=100, n_head=7)
    message = str(err.value)
    assert "100" in message and "7" in message
    # the suggested head counts really divide d_model
    suggested = [int(s) for s in message.split("e.g. [")[1].split("]")[0].split(",")]
    assert suggested and all(100 % h == 0 for h in suggested)


def test_bad_attention_lists_choices():
    with pytest.raises(ConfigError) as err:
        ModelConfig(attention="flash")
    assert "flash" in str(err.value)
    assert "manual" in str(err.value) and "sdpa" in str(err.value)


def test_bad_init_lists_choices():
    with pytest.raises(ConfigError, match="xavier_uniform"):
        ModelConfig(init="kaiming")


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "d_model"])
@pytest.mark.parametrize("value", [0, -4, 2.0, True])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("d_ff", [0, -1, 1.5])
def test_bad_d_ff(d_ff):
    with pytest.raises(ConfigError, match="d_ff"):
        ModelConfig(d_ff=d_ff)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_bad_dropout(dropout):
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=dropout)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert ModelConfig(d_model=96, n_head=3).head_dim == 32
