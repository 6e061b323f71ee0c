"""What a newcomer meets: progress totals, generate from an adapter alone, info, TensorBoard,
damaged run files (one line, exit 2, naming the file), adapter metadata beside its own adapter."""

import json
import re
import shutil

import pytest

from gemma_lora.cli import main

FAST = ["--preset", "tiny", "--sequence-length", "64", "--limit", "12", "--validation-rows", "4",
        "--test-rows", "4", "--batch-size", "4", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-step tiny run (its adapter, config, summary, before.json, checkpoints)."""
    directory = tmp_path_factory.mktemp("first") / "run"
    assert main(["train", *FAST, "--epochs", "2", "--max-steps", "3", "--checkpoint-every", "1",
                 "--output-dir", str(directory)]) == 0
    return directory


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gemma-lora: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_keras_run_counts_its_real_steps(tmp_path, capsys):
    """max_steps 3 of a 2-epoch run: the bar's total is 3, not the epoch's step count."""
    code = main(["train", *FAST, "--limit", "40", "--epochs", "2", "--max-steps", "3", "--answer-splits",
                 "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"training: 100%.*\| 3/3 \[", out), out


def test_a_fast_engine_run_counts_its_packed_steps(tmp_path, capsys):
    code = main(["train", *FAST, "--limit", "40", "--sequence-length", "256", "--engine", "fast", "--answer-splits",
                 "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    packed = int(re.search(r"engine: fast .*: (\d+) steps an epoch", out).group(1))
    assert packed < 36 // 4  # packing puts several of the 36 rows in a row
    assert re.search(rf"training: 100%.*\| {packed}/{packed} \[", out), out


def test_generate_takes_base_template_and_stops_from_the_adapter(run_dir, tmp_path, capsys):
    meta = json.loads((run_dir / "adapter.json").read_text())
    assert meta["base_preset"] == "tiny" and meta["stop_strings"] == ["\nInstruction:"]
    # No --preset: the default (gemma_2b_en, from Kaggle) would need credentials here.
    assert main(["generate", "--adapter", str(run_dir / "adapter.lora.h5"), "--prompt", "Hi?",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "base tiny" in out and "### Hi?" in out


def test_info_summarises_a_run_and_an_adapter(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for needle in ("base model: tiny", "LoRA rank 4, alpha 4, on query, value", "trained: 3 steps",
                   "validation token loss: ", "test answers ending with <eos>: ", "files: ", "checkpoints/"):
        assert needle in out, out
    assert len(out.splitlines()) < 15
    assert main(["info", str(run_dir / "adapter.lora.h5")]) == 0
    assert "rank 4, 4 LoRA layers, 2,816 parameters" in capsys.readouterr().out
    assert main(["info", str(run_dir), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"config.json", "summary.json", "adapter.json"}


def test_info_on_a_wrong_path_says_what_it_takes(tmp_path, capsys):
    one_line_error(capsys, main(["info", str(tmp_path / "nothing")]), "is not a run directory", ".lora.h5", "preset")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 4)" in out and "(default: gemma_2b_en)" in out and "'demo'" in out


def test_tensorboard_writes_an_events_file(tmp_path, capsys):
    assert main(["train", *FAST, "--max-steps", "2", "--answer-splits", "--tensorboard",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_without_its_package_is_refused_before_any_file(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    code = main(["train", *FAST, "--tensorboard", "--output-dir", str(tmp_path / "run")])
    one_line_error(capsys, code, "tensorboardX", "gemma-lora[tensorboard]")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["adapter.json", "config.json", "before.json", "checkpoint"])
def test_a_damaged_run_file_is_one_line_naming_it(run_dir, tmp_path, capsys, name):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    if name == "checkpoint":
        # An interrupted run whose newest checkpoint is cut short.
        for done in ("adapter.json", "adapter.lora.h5", "summary.json"):
            (copy / done).unlink()
        newest = sorted((copy / "checkpoints").glob("step-*.npz"))[-1]
        newest.write_bytes(newest.read_bytes()[:100])
        one_line_error(capsys, main(["train", "--resume", str(copy)]), newest.name, "Delete it to resume from")
        return
    (copy / name).write_text('{"rank": 4, oops')
    if name == "adapter.json":
        code = main(["generate", "--adapter", str(copy / "adapter.lora.h5"), "--prompt", "Hi"])
    elif name == "config.json":
        (copy / "adapter.json").unlink()
        code = main(["train", "--resume", str(copy)])
    else:
        (copy / "adapter.json").unlink()
        code = main(["train", "--resume", str(copy)])
    one_line_error(capsys, code, str(copy / name))


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("truncated", ["adapter", "checkpoint"])
def test_resume_and_info_refuse_a_truncated_adapter_or_checkpoint_and_change_nothing(run_dir, tmp_path, capsys, truncated):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    if truncated == "adapter":
        damaged = copy / "adapter.lora.h5"
    else:  # an interrupted run: no adapter yet, and its newest checkpoint cut short
        for name in ("adapter.lora.h5", "adapter.json", "summary.json"):
            (copy / name).unlink()
        damaged = sorted((copy / "checkpoints").glob("*.npz"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    before = snapshot(copy)
    fix = "--resume" if truncated == "adapter" else "Delete it to resume from"
    one_line_error(capsys, main(["train", "--resume", str(copy)]), str(damaged), fix)
    one_line_error(capsys, main(["info", str(copy)]), str(damaged), fix)
    assert snapshot(copy) == before


def test_the_prompts_line_says_what_the_rows_are(make_config):
    from gemma_lora.training.prepare import _describe_format

    config = make_config(chat=False)
    assert _describe_format(config, None, "dolly").startswith("prompts: the template; --chat writes")
    assert _describe_format(config, None, "completion").startswith(
        "prompts: as written (completion data: each row is its prompt followed by its completion, no template)")
    assert _describe_format(config, None, "text").startswith("prompts: none (text data")
    assert _describe_format(make_config(chat=True), True, "completion").startswith("prompts: Gemma's chat format (--chat)")


def test_an_adapter_reads_its_own_metadata_not_a_neighbours(run_dir, tmp_path, capsys):
    """foo.lora.h5 goes with foo.json; an adapter.json beside it belongs to adapter.lora.h5."""
    from gemma_lora.adapters.files import metadata_path, read_adapter

    shutil.copy(run_dir / "adapter.lora.h5", tmp_path / "foo.lora.h5")
    neighbour = json.loads((run_dir / "adapter.json").read_text())
    (tmp_path / "adapter.json").write_text(json.dumps(dict(neighbour, rank=99)))  # would not fit
    assert metadata_path(tmp_path / "foo.lora.h5") == tmp_path / "foo.json"
    assert read_adapter(tmp_path / "foo.lora.h5")[2] is None  # no foo.json: a stock adapter
    (tmp_path / "foo.json").write_text(json.dumps(neighbour))
    assert read_adapter(tmp_path / "foo.lora.h5")[2]["rank"] == 4
    assert main(["info", str(tmp_path / "foo.lora.h5")]) == 0
    assert "foo.json" in capsys.readouterr().out


def test_metrics_of_a_resumed_run_say_which_steps_they_cover(tmp_path, capsys):
    from gemma_lora.training import checkpoints

    run = tmp_path / "run"
    args = ["train", *FAST, "--limit", "40", "--max-steps", "6", "--checkpoint-every", "2", "--answer-splits",
            "--output-dir", str(run)]
    original = checkpoints.Checkpointer.on_train_batch_end

    def crash_after_step_4(self, batch, logs=None):
        original(self, batch, logs)
        if self.batches_done == 4:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints.Checkpointer, "on_train_batch_end", crash_after_step_4)
        assert main(args) == 130
    assert main(["train", "--resume", str(run)]) == 0
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(r["first_step"], r["last_step"]) for r in rows] == [("5", "6")]
