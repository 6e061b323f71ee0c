"""Jobs of several processes: who joins what, each process's share of a batch, and real jobs on localhost.

The jobs are real: `gemma-lora train` started as 2 processes with 2 virtual
CPU devices each, talking through JAX's coordination service and gloo on
127.0.0.1, compared with one process holding all 4 devices. Each process runs
in its own working directory, so a file written by the wrong process would
show. The training comparisons take minutes and are marked slow
(`pytest --run-slow tests/e2e/test_hosts.py`); every process has a hard timeout.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, write_jsonl
from test_resume import adapter_arrays, assert_same_adapter

from gemma_lora.data import TokenizedRows
from gemma_lora.errors import ConfigError
from gemma_lora.parallel import hosts
from gemma_lora.training import batching

# --- which job, from flags, Keras' variables or the launcher -------------------------------


def test_flags_make_a_job_and_one_process_is_none():
    job = hosts.job_from("10.0.0.1:12355", 4, 2, environ={})
    assert (job.coordinator, job.num_processes, job.process_id, job.source) == ("10.0.0.1:12355", 4, 2, "flags")
    assert hosts.job_from(environ={}) is None
    assert hosts.job_from("10.0.0.1:12355", 1, 0, environ={}) is None  # a job of one: nothing to join


def test_keras_variables_make_a_job_and_flags_win():
    environ = {hosts.COORDINATOR_VARIABLE: "10.0.0.1:1234,10.0.0.2:2345", hosts.NUM_PROCESSES_VARIABLE: "2",
               hosts.PROCESS_ID_VARIABLE: "1"}
    job = hosts.job_from(environ=environ)
    assert (job.coordinator, job.num_processes, job.process_id) == ("10.0.0.1:1234", 2, 1)  # the first address
    assert hosts.NUM_PROCESSES_VARIABLE in job.source
    assert hosts.job_from(process_id=0, environ=environ).process_id == 0


@pytest.mark.parametrize("environ, launcher", [
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"}, "SLURM"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, "TPU pod slice"),
])
def test_a_launcher_of_several_processes_lets_jax_discover_the_job(environ, launcher):
    job = hosts.job_from(environ=environ)
    assert (job.coordinator, job.num_processes, job.process_id, job.source) == (None, None, None, launcher)
    # One task, one worker, or the batch script of an allocation (no srun step): one process.
    for alone in ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, {"OMPI_COMM_WORLD_SIZE": "1"},
                  {"TPU_WORKER_HOSTNAMES": "t1k-w-0"}):
        assert hosts.job_from(environ=alone) is None


def test_coordinator_auto_leaves_the_rest_to_jax():
    job = hosts.job_from("auto", environ={})
    assert (job.coordinator, job.num_processes, job.process_id) == (None, None, None)


@pytest.mark.parametrize("args, environ, message", [
    ((None, 2, 0), {}, r"need --coordinator HOST:PORT"),
    (("10.0.0.1", 2, 0), {}, r"--coordinator must be HOST:PORT .* Received: '10.0.0.1'"),
    (("10.0.0.1:99999", 2, 0), {}, r"--coordinator must be HOST:PORT"),
    (("10.0.0.1:12355", None, 0), {}, r"needs --num-processes N"),
    (("10.0.0.1:12355", 2, None), {}, r"needs --process-id I on each \(0 to 1\)"),
    (("10.0.0.1:12355", 2, 2), {}, r"--process-id must be in 0..1 .* Received: 2"),
    (("10.0.0.1:12355", 0, 0), {}, r"--num-processes must be >= 1"),
    ((None, None, None), {"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, r"KERAS_DISTRIBUTION_NUM_PROCESSES must be a whole"),
])
def test_an_incomplete_job_names_what_is_missing(args, environ, message):
    with pytest.raises(ConfigError, match=message):
        hosts.job_from(*args, environ=environ)


def test_the_cli_refuses_an_incomplete_job_in_one_line_before_joining(capsys):
    from gemma_lora.cli import main

    assert main(["train", "--preset", "tiny", "--num-processes", "2", "--process-id", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "need --coordinator HOST:PORT" in err
    assert main(["train", "--preset", "tiny", "--coordinator-timeout", "0"]) == 2
    assert "--coordinator-timeout must be a number of seconds > 0" in capsys.readouterr().err


def test_auto_where_jax_finds_no_job_says_what_to_give_instead():
    from gemma_lora.errors import HostsError

    # JAX's own reason varies (no coordinator address, or a backend other tests already started);
    # the line names it and says what to give instead.
    with pytest.raises(HostsError, match=r"Cannot join a job JAX discovers \(--coordinator auto\): .+\. "
                                         r"Give --coordinator HOST:PORT, --num-processes and --process-id\.$"):
        hosts.join(hosts.job_from("auto", environ={}), timeout=30)
    assert not hosts.several()


def test_alone_every_exchange_is_local():
    assert hosts.process_count() == 1 and hosts.is_main() and not hosts.several()
    assert hosts.share("x", {"a": 1}) == [{"a": 1}]
    hosts.check_same("config", {"a": 1}, "fix")
    assert hosts.first("x", lambda: 3) == 3
    assert hosts.together("x", lambda: 4) == 4
    assert hosts.from_main("x", lambda: ("meta", {"w": np.ones(2)}))[0] == "meta"
    assert [a.tolist() for a in hosts.gather([np.arange(3)])] == [[0, 1, 2]]


# --- each process's share of a batch -----------------------------------------------------


def rows_of_lengths(lengths, width=128):
    n = len(lengths)
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    ids = np.where(mask, np.arange(1, n + 1)[:, None], 0).astype(np.int32)
    return TokenizedRows(ids, mask, ids, mask.astype(np.float32), 0, int(mask.sum()))


@pytest.mark.parametrize("index", [np.array([3, 0, 4, 1]), np.array([2, 5])])  # a full batch, a short last one
def test_the_shares_of_a_batch_make_the_whole_batch(index):
    rows = rows_of_lengths([10, 70, 5, 20, 66, 3])
    whole = batching.batch_arrays(rows, index, 4)
    shares = [batching.batch_arrays(rows, index, 4, share=(start, start + 2)) for start in (0, 2)]
    # Each share is as long as the whole batch (its own rows may be shorter), and together they are it.
    for name in ("token_ids", "padding_mask"):
        assert np.array_equal(np.concatenate([s[0][name] for s in shares]), whole[0][name])
    for part in (1, 2):
        assert np.array_equal(np.concatenate([s[part] for s in shares]), whole[part])
    assert whole[0]["token_ids"].shape == (4, batching.batch_length(rows, index))


# --- real jobs on localhost --------------------------------------------------------------

TINY = ["--preset", "tiny", "--sequence-length", "64", "--limit", "40", "--validation-rows", "4", "--test-rows", "0",
        "--answer-splits", "--max-new-tokens", "4", "--batch-size", "4", "--learning-rate", "1e-2",
        "--lora-targets", "query", "value", "ffw_linear"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, args, processes=2, devices=2, job=True):
    """Start `gemma-lora train ARGS` as `processes` processes of `devices` CPU devices each, each in its own directory."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = []
    for i in range(processes):
        cwd = tmp_path / f"process-{i}"
        cwd.mkdir(parents=True, exist_ok=True)
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        out, err = open(cwd / "stdout", "w"), open(cwd / "stderr", "w")
        process = subprocess.Popen([sys.executable, "-m", "gemma_lora.cli", "train", *args, *(flags if job else [])],
                                   cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        started.append((process, cwd, out, err))
    return started


def finish(started, timeout):
    """Wait for started processes, killing any still running at `timeout` seconds (a hang fails the test, never
    blocks the suite). Returns one dict per process: returncode, stdout, stderr, cwd."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process, cwd, out, err in started:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for process, cwd, out, err in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            out.close()
            err.close()
            results.append({"returncode": process.returncode, "cwd": cwd,
                            "stdout": (cwd / "stdout").read_text(), "stderr": (cwd / "stderr").read_text()})
    return results


def launch(tmp_path, args, processes=2, devices=2, timeout=300, job=True):
    """Run `gemma-lora train ARGS` as a job to its end (see `start` and `finish`)."""
    return finish(start(tmp_path, args, processes, devices, job), timeout)


# Gloo (the CPU collectives) prints "[Gloo] Rank 2 is connected to 3 peer ranks. Expected number of
# connected peer ranks is : 3" from each device's thread, in pieces that two threads may interleave.
GLOO = re.compile(r"\[Gloo\] Rank |is connected to|peer ranks\. Expected number of connected peer ranks is :|\d+|\s+")


def lines(text):
    """What a process printed itself: without gloo's connection lines and JAX's (absl's) log lines."""
    return [line for line in text.splitlines()
            if GLOO.sub("", line) and not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log"))]


def test_a_process_without_a_coordinator_stops_within_the_timeout_in_one_line(tmp_path, tiny_preset):
    started = time.monotonic()
    # Process 1 of 2, pointed at a port where nothing listens.
    (result,) = launch(tmp_path, [*TINY, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
                                  "--process-id", "1", "--coordinator-timeout", "3"], processes=1, job=False, timeout=60)
    took = time.monotonic() - started
    assert result["returncode"] == 2
    errors = lines(result["stderr"])
    assert len(errors) == 1 and "process 1 of 2 could not join the job at 127.0.0.1:" in errors[0], result["stderr"]
    assert "within 3 s" in errors[0] and "--coordinator-timeout" in errors[0]
    assert took < 3 + 25  # the timeout, plus starting Python and importing the CLI (JAX's own deadline is 30 s later)
    assert not any((result["cwd"]).glob("runs"))


@pytest.mark.slow
def test_processes_with_different_configs_are_refused_naming_the_difference(tmp_path, tiny_preset):
    args = [*TINY, "--max-steps", "1"]
    port = free_port()
    job = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for i, rate in enumerate(("1e-2", "3e-3")):
        cwd = tmp_path / f"process-{i}"
        cwd.mkdir()
        runs.append((subprocess.Popen(
            [sys.executable, "-m", "gemma_lora.cli", "train", *args, "--learning-rate", rate, *job, "--process-id", str(i),
             "--output-dir", str(tmp_path / "run")],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True), cwd))
    try:
        outputs = [process.communicate(timeout=180) for process, _ in runs]
    finally:
        for process, _ in runs:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    for (process, _), (out, err) in zip(runs, outputs):
        assert process.returncode == 2, err
        errors = lines(err)
        assert len(errors) == 1, err
        assert "do not share the same config: learning_rate is 0.01 on process 0, 0.003 on process 1" in errors[0]
        assert "only --process-id differs" in errors[0]
        assert not lines(out)  # refused before anything was printed
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_processes_that_read_different_data_are_refused_and_leave_nothing(tmp_path, tiny_preset):
    # The same command everywhere, but each host's data.jsonl holds other records.
    for i in range(2):
        records = [{"instruction": f"Say {i} {n}.", "response": f"{i} {n}."} for n in range(12)]
        (tmp_path / f"process-{i}").mkdir()
        write_jsonl(tmp_path / f"process-{i}" / "data.jsonl", records)
    args = [*TINY, "--data", "data.jsonl", "--limit", "12", "--max-steps", "1", "--output-dir", "run"]
    for result in launch(tmp_path, args, timeout=180):
        assert result["returncode"] == 2, result["stderr"][-3000:]
        errors = lines(result["stderr"])
        assert len(errors) == 1, result["stderr"]
        assert "do not share the same training data: '" in errors[0] and "on process 1. Give every process the same data (data.jsonl)" in errors[0]
    assert not (tmp_path / "process-0" / "run").exists()  # process 0 made it, and removed it empty


@pytest.mark.slow
def test_a_host_without_the_preset_stops_every_process(tmp_path, tiny_preset):
    import shutil

    shutil.copytree(tiny_preset, tmp_path / "process-0" / "preset")  # process 1's host has none
    args = [*TINY, "--preset", "preset", "--max-steps", "1", "--output-dir", "run"]
    main, other = launch(tmp_path, args, timeout=180)
    for result in (main, other):
        assert result["returncode"] == 2, result["stderr"][-3000:]
        assert len(lines(result["stderr"])) == 1, result["stderr"]
    assert lines(other["stderr"])[0].startswith("gemma-lora: error: Unknown preset 'preset'")
    assert lines(main["stderr"])[0] == lines(other["stderr"])[0].replace("error: ", "error: Process 1: ", 1)
    assert not (tmp_path / "process-0" / "run").exists()


def read_run(run_dir):
    with open(run_dir / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    return {"token_loss": float(epochs[-1]["token_loss"]),
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "adapter": adapter_arrays(run_dir)}


def run_job(tmp_path, args, processes, devices, timeout=400):
    """A finished job's run (read from process 0's directory), after checking what each process printed and wrote."""
    results = launch(tmp_path, [*args, "--output-dir", "run"], processes, devices, timeout)
    for result in results:
        assert result["returncode"] == 0, result["stderr"][-3000:]
    main, *others = results
    assert lines(main["stdout"])[-1] == "done: run"
    for other in others:
        assert not lines(other["stdout"]), other["stdout"]  # only process 0 prints ...
        assert sorted(p.name for p in other["cwd"].iterdir()) == ["stderr", "stdout"]  # ... and writes
    return read_run(main["cwd"] / "run"), main


def assert_same_training(job, reference):
    # The LoRA B factors start at zero and the steps moved them far beyond the
    # adapter tolerance, so a process whose gradient went missing would show.
    moved = max(np.abs(a).max() for name, a in reference["adapter"].items() if name.endswith("lora_kernel_b"))
    assert moved > 1000 * 1e-6
    # float32 sums in another order across processes: 1e-5 relative.
    assert job["token_loss"] == pytest.approx(reference["token_loss"], rel=1e-5)
    after = reference["summary"]["token_loss_after"]["validation"]
    assert job["summary"]["token_loss_after"]["validation"] == pytest.approx(after, rel=1e-5)
    assert job["summary"]["train"]["steps"] == reference["summary"]["train"]["steps"]
    assert_same_adapter(job["adapter"], reference["adapter"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["--distribution", "data"],
    ["--distribution", "model", "--model-parallel", "2"],
    ["--distribution", "model", "--model-parallel", "2", "--engine", "fast"],
], ids=["data", "model", "fast-model"])
def test_two_processes_train_as_one_process_with_all_the_devices(tmp_path, tiny_preset, layout):
    args = [*TINY, *layout, "--max-steps", "4"]
    reference, _ = run_job(tmp_path / "one", args, processes=1, devices=4)
    job, main = run_job(tmp_path / "two", args, processes=2, devices=2)
    assert "in 2 processes" in main["stdout"]
    assert_same_training(job, reference)
    if "fast" in layout:  # the same packed rows, whatever the devices
        assert job["summary"]["data"]["packed_real_token_fraction"] == reference["summary"]["data"]["packed_real_token_fraction"]
        assert job["summary"]["train"]["examples_this_session"] == reference["summary"]["train"]["examples_this_session"]


@pytest.mark.slow
def test_a_job_resumes_with_another_number_of_processes(tmp_path, tiny_preset):
    args = [*TINY, "--distribution", "data", "--checkpoint-every", "2"]
    reference, _ = run_job(tmp_path / "whole", [*args, "--max-steps", "6"], processes=1, devices=4)
    # Two processes train 2 steps; one process with all 4 devices takes the
    # run on to step 4, then two processes again to step 6. Between stages the
    # finished run is made unfinished and longer (its config.json edited).
    _, main = run_job(tmp_path / "two", [*args, "--max-steps", "2"], processes=2, devices=2)
    run_dir = main["cwd"] / "run"
    for stage, (processes, devices, steps) in enumerate([(1, 4, 4), (2, 2, 6)]):
        for name in ("adapter.lora.h5", "adapter.json", "summary.json"):
            (run_dir / name).unlink()
        config = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps(dict(config, max_steps=steps)))
        results = launch(tmp_path / f"resume-{stage}", ["--resume", str(run_dir)], processes, devices, timeout=400)
        for result in results:
            assert result["returncode"] == 0, result["stderr"][-3000:]
        assert f"resuming from step-{steps - 2:08d}.npz: {steps - 2} optimizer steps" in results[0]["stdout"]
        assert all(not lines(r["stdout"]) for r in results[1:])  # process 1 read process 0's run, wrote nothing
    assert json.loads((run_dir / "summary.json").read_text())["train"]["steps"] == 6
    assert_same_adapter(adapter_arrays(run_dir), reference["adapter"])


@pytest.mark.slow
def test_when_a_process_dies_the_other_stops_in_one_line_and_its_checkpoints_stay_whole(tmp_path, tiny_preset):
    from gemma_lora import run_files

    timeout = 5
    started = start(tmp_path, [*TINY, "--distribution", "data", "--max-steps", "400", "--epochs", "100",
                               "--checkpoint-every", "1", "--heartbeat-timeout", str(timeout), "--output-dir", "run"])
    (survivor, cwd, *_), (victim, *_) = started
    checkpoints = cwd / "run" / run_files.CHECKPOINT_DIR
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.npz")) and survivor.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(checkpoints.glob("*.npz")), (cwd / "stderr").read_text()[-3000:]
    killed = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)
    # The margin: the heartbeat's interval, the slowest step in flight, Python's exit.
    margin = 15
    results = finish(started, timeout=timeout + margin + 30)
    took = time.monotonic() - killed
    result = results[0]
    assert result["returncode"] == hosts.EXIT_PEER_LOST, result["stderr"][-3000:]
    assert took < timeout + margin, took
    errors = [line for line in lines(result["stderr"]) if line.startswith("gemma-lora:")]
    assert len(errors) == 1, result["stderr"][-3000:]
    assert "process 1 of 2 vanished" in errors[0] and "--resume" in errors[0], errors[0]
    assert "Terminating process" not in result["stderr"]  # JAX's own abort never came
    run_files.read_checkpoint(run_files.latest_checkpoint(cwd / "run"))  # whole: a resume can start from it
