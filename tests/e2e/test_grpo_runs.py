"""GRPO runs on `tiny`: a reward for one first token is learned, the base stays bit-identical, KL starts at 0,
a crashed or SIGKILLed run resumes to the same adapter and the same rollouts, and bad inputs stop with one line."""

import csv
import json
import re

import numpy as np
import pytest
from conftest import write_jsonl
from test_resume import (
    CrashAt,
    adapter_arrays,
    assert_same_adapter,
    sigkill_after_first_checkpoint,
)

from gemma_lora.cli import main
from gemma_lora.training.run import Run, run_training

# The tiny preset's tokenizer id that the reward asks the completion to start with. On the prompt below at
# temperature 0.2 the base samples it about one time in ten (the first batch's reward is asserted low), so the
# reward is learnable and not already earned.
TARGET = 620
REWARD_FILE = f'''
def reward(completion_ids, **_):
    return [float(bool(ids) and ids[0] == {TARGET}) for ids in completion_ids]
'''

SETTINGS = dict(objective="grpo", engine="fast", sequence_length=32, max_new_tokens=2, batch_size=2,
                num_generations=8, temperature=0.2, learning_rate=3e-2, validation_rows=4, test_rows=4,
                answer_splits=[], prompts=[], precision="float32")


def task(tmp):
    """(data, rewards): one prompt many times, and the first-token reward as a file."""
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": "say yes"}] * 100)
    (tmp / "first_token.py").write_text(REWARD_FILE)
    return str(data), [str(tmp / "first_token.py")]


def rollout_rows(run_dir):
    with open(run_dir / "rollouts.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    """A GRPO run with a KL term (2 prompts x 16 completions a step), stepped by hand: (Run, the base weights after setup, summary, rollouts.csv rows)."""
    from gemma_lora.config import resolve_config

    tmp = tmp_path_factory.mktemp("grpo")
    data, rewards = task(tmp)
    config = resolve_config(overrides=dict(SETTINGS, preset="tiny", data=data, rewards=rewards, beta=0.04,
                                           num_generations=16, max_steps=40, output_dir=str(tmp / "run")))
    run = Run(config, echo=lambda *a: None)
    with run.session():
        run.setup()
        base = {v.path: np.array(v.value) for v in run.causal_lm.weights if not v.trainable}
        run.score_before()
        run.fit()
        run.score_after()
        run.save()
    return run, base, json.loads((tmp / "run" / "summary.json").read_text()), rollout_rows(tmp / "run")


def test_grpo_learns_a_reward_for_the_first_token(grpo):
    _, _, summary, rows = grpo
    rewards = [float(r["reward"]) for r in rows]
    assert len(rows) == 40 and all(r["sampled"] == "True" for r in rows)  # grpo_iterations 1: every step samples
    assert rewards[0] <= 0.3, rewards  # about chance at the start
    # Measured 2026-12-07: 0.06 at step 1, 0.92 over steps 31-40 (once p is near 1 most groups are all 1s and
    # give no signal, so the last tenth closes slowly).
    assert np.mean(rewards[-10:]) >= 0.9, rewards
    assert summary["objective"] == "grpo" and summary["rollouts"]["batches_sampled"] == 40
    assert summary["rollouts"]["last"]["reward"] == rewards[-1]


def test_grpo_leaves_every_frozen_weight_bit_identical(grpo):
    run, base, _, _ = grpo
    after = {v.path: np.array(v.value) for v in run.causal_lm.weights if not v.trainable}
    assert after.keys() == base.keys() and len(base) > 10
    for name, value in base.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert any(np.abs(v.value).max() > 0 for v in run.causal_lm.trainable_variables if "lora_kernel_b" in v.path)


def test_kl_is_zero_at_the_first_step_and_grows_as_the_policy_moves(grpo):
    _, _, _, rows = grpo
    kl = [float(r["kl"]) for r in rows]
    assert abs(kl[0]) < 1e-7 and max(kl[1:]) > 1e-4, kl
    assert all(float(r["clip_fraction"]) == 0.0 for r in rows)  # one pass per batch: the ratio is 1
    assert max(float(r["logp_gap"]) for r in rows) < 1e-4  # the decoder's log-probs are the forward's


def test_the_run_reports_rewards_groups_lengths_and_the_time_split(grpo):
    run, _, summary, rows = grpo
    first = rows[0]
    for column in ("reward_first_token", "reward_first_token_std", "equal_reward_groups", "completion_length",
                   "ended_share", "sampling_seconds", "update_seconds"):
        assert column in first, sorted(first)
    assert all(0 <= float(r["equal_reward_groups"]) <= 1 and 1 <= float(r["completion_length"]) <= 2 for r in rows)
    assert all(r["reward"] == r["reward_first_token"] for r in rows)  # one reward of weight 1: the total
    # A batch whose rewards are all 0 or all 1 has only equal groups; some group learned to all-1 on the way.
    assert all(float(r["equal_reward_groups"]) == 1 for r in rows if float(r["reward"]) in (0.0, 1.0))
    assert any(float(r["equal_reward_groups"]) > 0 for r in rows)
    train = summary["train"]
    assert train["sampling_seconds"] > 0 and train["update_seconds"] > 0
    assert (run.run_dir / "reward_curve.png").stat().st_size > 1000
    assert summary["rollouts"]["reward_curve"] == "reward_curve.png"


def test_several_passes_over_each_batch_clip_the_ratio(tmp_path, make_config):
    data, rewards = task(tmp_path)
    config = make_config(**dict(SETTINGS, data=data, rewards=rewards, grpo_iterations=2, epsilon=0.05,
                                learning_rate=5e-2, max_steps=8, output_dir=str(tmp_path / "run")))
    run_training(config, echo=lambda *a: None)
    rows = rollout_rows(tmp_path / "run")
    assert [r["sampled"] for r in rows] == ["True", "False"] * 4  # each batch sampled once, stepped on twice
    second_passes = [r for r in rows if r["sampled"] == "False"]
    assert all(r["reward"] == first["reward"] for first, r in zip(rows[::2], second_passes))  # the same completions
    assert max(float(r["clip_fraction"]) for r in second_passes) > 0
    assert all(float(r["clip_fraction"]) == 0 for r in rows[::2])


RESUME = dict(SETTINGS, max_steps=8, checkpoint_every=3, beta=0.04)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from gemma_lora.config import resolve_config

    tmp = tmp_path_factory.mktemp("uninterrupted")
    data, rewards = task(tmp)
    run_training(resolve_config(overrides=dict(RESUME, preset="tiny", data=data, rewards=rewards,
                                               output_dir=str(tmp / "run"))), echo=lambda *a: None)
    return data, rewards, adapter_arrays(tmp / "run"), rollout_rows(tmp / "run")


def _same_rollouts(rows, reference):
    """The same completions were sampled at each step: the same rewards, lengths and KL, the times aside."""
    assert [r["optimizer_step"] for r in rows] == [r["optimizer_step"] for r in reference]
    for row, ref in zip(rows, reference):
        for column in ("reward", "completion_length", "equal_reward_groups"):
            assert row[column] == ref[column], (column, row, ref)
        np.testing.assert_allclose(float(row["kl"]), float(ref["kl"]), rtol=1e-4, atol=1e-9)


def test_a_crashed_grpo_run_resumes_to_the_uninterrupted_adapter_and_rollouts(tmp_path, make_config, uninterrupted):
    data, rewards, reference, reference_rows = uninterrupted
    config = make_config(**dict(RESUME, data=data, rewards=rewards, output_dir=str(tmp_path / "run")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, echo=lambda *a: None, callbacks=[CrashAt(5)])
    assert len(rollout_rows(tmp_path / "run")) == 5  # steps 4 and 5 are logged, then sampled again on resume
    lines = []
    run_training(config, echo=lines.append, resume=True)
    assert any("resuming from step-00000003.npz" in line for line in lines)
    # What it reads is its prompts, not the packed SFT rows of the same data (which it never trains on).
    assert any(line.startswith("prompts: train ") for line in lines), lines
    assert not any(line.startswith("train tokens:") for line in lines), lines
    assert_same_adapter(adapter_arrays(tmp_path / "run"), reference)
    _same_rollouts(rollout_rows(tmp_path / "run"), reference_rows)


@pytest.mark.slow
def test_a_sigkilled_grpo_run_resumes_to_the_uninterrupted_adapter(tmp_path, uninterrupted):
    data, rewards, reference, reference_rows = uninterrupted
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", data, "--rewards", *rewards, "--output-dir", str(run_dir),
            "--answer-splits", "--prompts",
            *[f"--{k.replace('_', '-')}={v}" for k, v in RESUME.items() if k not in ("answer_splits", "prompts")]]
    sigkill_after_first_checkpoint(args, run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_adapter(adapter_arrays(run_dir), reference)
    _same_rollouts(rollout_rows(run_dir), reference_rows)


def _reward(tmp, body):
    path = tmp / "bad_reward.py"
    path.write_text("import math\n\ndef reward(completions, **_):\n    " + body + "\n")
    return str(path)


BAD_INPUTS = {
    "reward module missing": (lambda t: ["--rewards", "no_such_module_xyz:score"], r"no_such_module_xyz"),
    "reward function missing": (lambda t: ["--rewards", _reward(t, "return [1.0] * len(completions)") + ":nope"],
                                r"bad_reward\.py.*has no function 'nope'|nope"),
    "reward raises": (lambda t: ["--rewards", _reward(t, "raise ValueError('boom')")], r"bad_reward\.py.*boom"),
    "reward returns NaN": (lambda t: ["--rewards", _reward(t, "return [math.nan] * len(completions)")],
                           r"bad_reward\.py.*(NaN|nan)"),
    "reward returns the wrong length": (lambda t: ["--rewards", _reward(t, "return [1.0]")],
                                        r"bad_reward\.py.*returned 1 .*16|1 value"),
    "fewer than 2 generations": (lambda t: ["--rewards", "ends", "--num-generations", "1"], r"num_generations=1"),
    "exact_match without answers": (lambda t: ["--rewards", "exact_match"], r"exact_match.*answer"),
    "temperature 0": (lambda t: ["--rewards", "ends", "--temperature", "0"], r"temperature=0"),
    "no rewards": (lambda t: [], r"rewards"),
    "text data": (lambda t: ["--rewards", "ends", "--data", str(write_jsonl(t / "text.jsonl", [{"text": "a b"}] * 20))],
                  r"prompt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_grpo_input_is_one_line_exit_2_and_leaves_no_files(tmp_path, capsys, case):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}"} for i in range(24)])
    make_args, pattern = BAD_INPUTS[case]
    extra = make_args(tmp_path)
    data_args = [] if "--data" in extra else ["--data", str(data)]
    args = ["train", "--preset", "tiny", "--objective", "grpo", "--engine", "fast", "--sequence-length", "32",
            "--max-new-tokens", "2", "--batch-size", "2", "--max-steps", "1", "--validation-rows", "4",
            "--test-rows", "4", "--answer-splits", "--prompts", *data_args, *extra,
            "--output-dir", str(tmp_path / "run")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("gemma-lora: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    run_dir = tmp_path / "run"
    assert not (run_dir / "adapter.lora.h5").exists() and not (run_dir / "summary.json").exists()
