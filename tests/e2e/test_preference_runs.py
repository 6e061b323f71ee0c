"""Preference runs on `tiny`: DPO learns a crafted preference, the base stays bit-identical, the cached reference
equals a fresh computation, SFT → DPO with --init-adapter, every objective trains, and a run resumes exactly."""

import json
import random

import numpy as np
import pytest
from conftest import write_jsonl
from test_resume import CrashAt, adapter_arrays, assert_same_adapter, sigkill_after_first_checkpoint

from gemma_lora.cli import main
from gemma_lora.model import loading
from gemma_lora.training import preference
from gemma_lora.training.run import Run, run_training

WORDS = "the a cat dog runs sits blue red big small tree house".split()


def crafted_pairs(path, n=80, seed=0):
    """Chosen: a short answer that ends. Rejected: the same answer repeated until it runs on."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"prompt": "Say " + " ".join(rng.choice(WORDS) for _ in range(3)), "chosen": answer,
                     "rejected": " ".join([answer] * 3)})
    return str(write_jsonl(path, rows))


SETTINGS = dict(objective="dpo", engine="fast", sequence_length=96, batch_size=4, limit=64, validation_rows=12,
                test_rows=8, learning_rate=5e-3, beta=0.5, answer_splits=[], prompts=[], max_new_tokens=2,
                checkpoint_every=5, precision="float32")


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    """A DPO run stepped by hand: (Run, the base weights after setup, its summary)."""
    from gemma_lora.config import resolve_config

    tmp = tmp_path_factory.mktemp("dpo")
    config = resolve_config(overrides=dict(SETTINGS, preset="tiny", data=crafted_pairs(tmp / "pairs.jsonl"),
                                           max_steps=30, output_dir=str(tmp / "run")))
    run = Run(config, echo=lambda *a: None)
    with run.session():
        run.setup()
        base = {v.path: np.array(v.value) for v in run.causal_lm.weights if not v.trainable}
        run.score_before()
        run.fit()
        run.score_after()
        run.save()
    return run, base, json.loads((tmp / "run" / "summary.json").read_text())


def test_dpo_learns_the_preference_on_held_out_pairs(dpo):
    _, _, summary = dpo
    before, after = summary["pairs_before"]["validation"], summary["pairs_after"]["validation"]
    assert before["reward_accuracy"] == 0.0 and abs(before["loss"] - np.log(2)) < 1e-6  # the policy is the reference
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0 and after["loss"] < before["loss"]
    assert after["chosen_logps"] - after["rejected_logps"] > before["chosen_logps"] - before["rejected_logps"]
    assert summary["objective"] == "dpo" and summary["pairs_after"]["test"]["reward_accuracy"] >= 0.9


def test_dpo_leaves_every_frozen_weight_bit_identical(dpo):
    run, base, _ = dpo
    after = {v.path: np.array(v.value) for v in run.causal_lm.weights if not v.trainable}
    assert after.keys() == base.keys() and len(base) > 10
    for name, value in base.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert any(np.abs(v.value).max() > 0 for v in run.causal_lm.trainable_variables if "lora_kernel_b" in v.path)


def test_the_cached_reference_equals_a_fresh_computation(dpo):
    run, _, _ = dpo
    cached = preference.load_reference(run.run_dir / preference.REFERENCE_FILE)
    assert set(cached) == {"train", "validation", "test"} and len(cached["train"]) == len(run.pairs["train"])
    fresh_lm = loading.load_causal_lm(_preset_dir(run.config), "float32", run.config.sequence_length)
    loading.enable_lora(fresh_lm, run.config.lora_rank, run.config.lora_alpha, run.config.lora_targets, seed=0)
    scorer = preference.PairScorer(fresh_lm, run.config, run.precision)
    for split in ("train", "validation"):
        indices = sorted(cached[split])
        fresh = preference.reference_logps(scorer, run.pairs[split], indices, label=None)
        for i in indices:
            for side in (0, 1):
                np.testing.assert_allclose(cached[split][i][side], fresh[i][side], rtol=1e-6, atol=1e-6)


def _preset_dir(config):
    from gemma_lora.model import presets

    return presets.resolve_preset(config.preset, config.preset_version)


def test_sft_then_dpo_from_its_adapter(tmp_path, make_config, capsys):
    """--init-adapter: the new adapter starts from the SFT one, which is also the reference."""
    data = crafted_pairs(tmp_path / "pairs.jsonl")
    sft = tmp_path / "sft"
    run_training(make_config(**dict(SETTINGS, objective="sft", max_steps=6, output_dir=str(sft), data=data)),
                 echo=lambda *a: None)
    dpo_dir = tmp_path / "dpo"
    config = make_config(**dict(SETTINGS, max_steps=4, init_adapter=str(sft), lora_rank=2, output_dir=str(dpo_dir),
                                data=data))
    lines = []
    run_training(config, echo=lines.append)
    assert any("starting from" in line and str(sft) in line for line in lines)
    recorded = json.loads((dpo_dir / "config.json").read_text())
    assert recorded["lora_rank"] == 4 and recorded["init_adapter"] == str(sft)  # the adapter's rank, not the flag's
    # The reference is the SFT adapter: before training, the policy (= the SFT model) equals it.
    summary = json.loads((dpo_dir / "summary.json").read_text())
    assert abs(summary["pairs_before"]["validation"]["loss"] - np.log(2)) < 1e-6
    start, trained = adapter_arrays(sft), adapter_arrays(dpo_dir)
    assert start.keys() == trained.keys()
    assert any(not np.array_equal(start[k], trained[k]) for k in start)
    # The cached reference is the SFT model's log-probs (fresh: the base with the SFT adapter).
    from gemma_lora.adapters.store import load_adapter

    fresh_lm = loading.load_causal_lm(_preset_dir(config), "float32", config.sequence_length)
    load_adapter(fresh_lm, sft / "adapter.lora.h5")
    from gemma_lora.training.prepare import prepare  # the pairs, tokenized as the run did

    pairs = prepare(run_files_config(dpo_dir), lambda line: None)[7]
    cached = preference.load_reference(dpo_dir / preference.REFERENCE_FILE)["validation"]
    fresh = preference.reference_logps(preference.PairScorer(fresh_lm, config, "float32"), pairs["validation"],
                                       sorted(cached), label=None)
    for i in cached:
        np.testing.assert_allclose(cached[i][0], fresh[i][0], rtol=1e-5, atol=1e-5)


def run_files_config(run_dir):
    from gemma_lora.config import load_config_file, resolve_config

    return resolve_config(load_config_file(run_dir / "config.json"))


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_each_objective_lowers_its_held_out_loss(tmp_path, make_config, objective):
    config = make_config(**dict(SETTINGS, objective=objective, beta=None, max_steps=15,
                                data=crafted_pairs(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "run")))
    run_training(config, echo=lambda *a: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["pairs_before"]["validation"], summary["pairs_after"]["validation"]
    assert np.isfinite(after["loss"]) and after["loss"] < before["loss"], (before, after)
    assert (tmp_path / "run" / preference.REFERENCE_FILE).exists() == (objective == "ipo")  # orpo, simpo: none


RESUME = dict(SETTINGS, max_steps=12, checkpoint_every=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = crafted_pairs(tmp / "pairs.jsonl")
    from gemma_lora.config import resolve_config

    run_training(resolve_config(overrides=dict(RESUME, preset="tiny", data=data, output_dir=str(tmp / "run"))),
                 echo=lambda *a: None)
    return data, adapter_arrays(tmp / "run")


def test_a_crashed_dpo_run_resumes_to_the_uninterrupted_adapter(tmp_path, make_config, uninterrupted):
    data, reference = uninterrupted
    config = make_config(**dict(RESUME, data=data, output_dir=str(tmp_path / "run")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, echo=lambda *a: None, callbacks=[CrashAt(8)])
    lines = []
    run_training(config, echo=lines.append, resume=True)
    assert any("resuming from step-00000006.npz" in line for line in lines)
    assert not any(line.startswith("reference:") for line in lines)  # read back, not recomputed
    assert_same_adapter(adapter_arrays(tmp_path / "run"), reference)


@pytest.mark.slow
def test_a_sigkilled_dpo_run_resumes_to_the_uninterrupted_adapter(tmp_path, uninterrupted):
    data, reference = uninterrupted
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", data, "--output-dir", str(run_dir), "--answer-splits", "--prompts",
            *[f"--{k.replace('_', '-')}={v}" for k, v in RESUME.items() if k not in ("answer_splits", "prompts")]]
    sigkill_after_first_checkpoint(args, run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_adapter(adapter_arrays(run_dir), reference)


def test_a_dpo_adapter_exports_to_peft_and_loads_back(dpo, tmp_path):
    run, _, _ = dpo
    assert main(["export", str(run.run_dir / "adapter.lora.h5"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").exists()


def test_every_pair_a_short_shuffled_run_trains_on_has_its_reference(tmp_path, make_config):
    """The first step's DPO loss is log 2 (the policy is the reference) on a run that stops mid-epoch."""
    import keras

    class FirstLoss(keras.callbacks.Callback):
        losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(logs["loss"])

    config = make_config(**dict(SETTINGS, max_steps=3, data=crafted_pairs(tmp_path / "pairs.jsonl"),
                                output_dir=str(tmp_path / "run")))
    run_training(config, echo=lambda *a: None, callbacks=[FirstLoss()])
    assert abs(FirstLoss.losses[0] - np.log(2)) < 1e-4, FirstLoss.losses
    cached = preference.load_reference(tmp_path / "run" / preference.REFERENCE_FILE)["train"]
    assert 0 < len(cached) < 52  # only the pairs of the 3 steps, not the epoch's
