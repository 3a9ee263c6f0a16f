from __future__ import annotations

import json

import pytest
import yaml

from lm import ConfigError, ModelConfig


def custom_config() -> ModelConfig:
    # every field away from its default, so a round trip that drops a field is caught
    return ModelConfig(vocab_size=77, block_size=33, n_layer=3, n_head=6, d_model=24, d_ff=50, dropout=0.25,
                       bias=False, tie_weights=False, pos="rope", rope_base=500000.0, norm="rmsnorm",
                       norm_position="post", norm_eps=1e-6, attention="sliding_window", n_kv_heads=2, window=8,
                       sparse_block=8, sparse_local=1, sparse_stride=2, sparse_pattern="full", ffn="moe",
                       n_experts=4, moe_top_k=1, moe_expert="swiglu", moe_aux_loss_coef=0.05, init="xavier_uniform",
                       gradient_checkpointing=True)


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


# ---- components --------------------------------------------------------------------------------------
def test_defaults_are_gpt2s_components():
    config = ModelConfig()
    assert (config.pos, config.norm, config.norm_position, config.attention, config.ffn) == (
        "learned", "layernorm", "pre", "sdpa", "gelu")
    assert config.n_kv_heads is None and config.kv_heads == config.n_head
    assert not config.gradient_checkpointing


def test_a_config_written_before_the_component_fields_still_loads():
    old = {"vocab_size": 65, "block_size": 64, "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": None,
           "dropout": 0.0, "bias": True, "tie_weights": True, "attention": "sdpa", "init": "gpt2", "norm_eps": 1e-5}
    config = ModelConfig.from_dict(old)
    assert config == ModelConfig(**old) and config.pos == "learned" and config.ffn == "gelu"


@pytest.mark.parametrize("field, value, known", [
    ("pos", "alibi", ["learned", "none", "rope", "sinusoidal"]),
    ("norm", "batchnorm", ["layernorm", "rmsnorm", "scalenorm"]),
    ("norm_position", "sandwich", ["post", "pre"]),
    ("attention", "flash", ["block_sparse", "linear", "manual", "sdpa", "sliding_window"]),
    ("ffn", "relu", ["gelu", "gelu_tanh", "moe", "swiglu"]),
    ("moe_expert", "moe", ["gelu", "gelu_tanh", "swiglu"]),
    ("sparse_pattern", "random", ["local_strided", "full"]),
])
def test_unknown_component_lists_the_known_names(field, value, known):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and str(known) in str(err.value)


def test_every_registered_name_is_accepted():
    choices = ModelConfig.component_choices()
    for name in choices["pos"]:
        ModelConfig(pos=name)
    for name in choices["norm"]:
        ModelConfig(norm=name)
    for name in choices["attention"]:
        ModelConfig(attention=name, window=8)
    for name in choices["ffn"]:
        ModelConfig(ffn=name)


@pytest.mark.parametrize("n_kv_heads", [5, 8, 24])
def test_kv_heads_must_divide_heads_and_the_valid_ones_are_listed(n_kv_heads):
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=96, n_head=12, n_kv_heads=n_kv_heads)
    message = str(err.value)
    assert f"n_kv_heads={n_kv_heads}" in message and "n_head=12" in message
    assert "[1, 2, 3, 4, 6, 12]" in message
    for valid in (1, 2, 3, 4, 6, 12, None):
        assert ModelConfig(d_model=96, n_head=12, n_kv_heads=valid).kv_heads == (valid or 12)


def test_sliding_window_needs_a_window():
    with pytest.raises(ConfigError, match="window"):
        ModelConfig(attention="sliding_window")
    with pytest.raises(ConfigError, match="window=0"):
        ModelConfig(attention="sliding_window", window=0)
    assert ModelConfig(attention="sliding_window", window=1).window == 1


def test_top_k_cannot_exceed_the_experts():
    with pytest.raises(ConfigError, match="moe_top_k=3 exceeds n_experts=2"):
        ModelConfig(ffn="moe", n_experts=2, moe_top_k=3)
    ModelConfig(ffn="moe", n_experts=2, moe_top_k=2)


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ConfigError, match="head_dim.*even") as err:
        ModelConfig(d_model=36, n_head=4, pos="rope")  # head_dim 9
    assert "36 / 4 = 9" in str(err.value)
    ModelConfig(d_model=36, n_head=4, pos="learned")  # fine without RoPE
    ModelConfig(d_model=36, n_head=3, pos="rope")  # head_dim 12


@pytest.mark.parametrize("field, value", [("rope_base", 1.0), ("rope_base", -5.0), ("norm_eps", 0.0),
                                          ("norm_eps", "small"), ("moe_aux_loss_coef", -0.1),
                                          ("bias", 1), ("tie_weights", "yes"), ("gradient_checkpointing", None),
                                          ("n_experts", 0), ("moe_top_k", 0), ("sparse_block", 0),
                                          ("sparse_local", -1), ("sparse_stride", -1), ("n_kv_heads", 0)])
def test_bad_values_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_zero_local_blocks_and_stride_are_allowed():
    config = ModelConfig(attention="block_sparse", sparse_local=0, sparse_stride=0)
    assert (config.sparse_local, config.sparse_stride) == (0, 0)


# ---- property-based: any values, a valid config or a ConfigError ---------------------------------------
def _any_value():
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=12), st.lists(st.integers(0, 4), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def test_any_model_settings_give_a_valid_config_or_a_config_error():
    """Values of any type in any field (as a hand-edited YAML file or a damaged checkpoint might hold)
    give either a config that passes its own validation and round-trips, or a ConfigError; never
    another exception (a TypeError deep inside, a NaN accepted). Fixed budget: 300 examples."""
    import dataclasses
    import math

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    names = [f.name for f in dataclasses.fields(ModelConfig)]

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(names), _any_value(), max_size=4))
    def check(changes):
        data = {**ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32).to_dict(), **changes}
        try:
            config = ModelConfig.from_dict(data)
        except ConfigError:
            return
        assert ModelConfig.from_dict(config.to_dict()) == config
        for value in config.to_dict().values():
            assert not (isinstance(value, float) and not math.isfinite(value))

    check()


def test_any_training_settings_give_a_valid_config_or_a_training_error():
    """The same for TrainConfig: every setting a --config file may hold."""
    import dataclasses
    import math

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lm import TrainConfig, TrainingError

    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("out_dir",)]

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(names), _any_value(), max_size=4))
    def check(changes):
        try:
            config = TrainConfig.from_dict({**TrainConfig().to_dict(), **changes})
        except TrainingError:
            return
        for value in config.to_dict().values():
            assert not (isinstance(value, float) and not math.isfinite(value))

    check()
