"""A job of several processes (one host or many): join JAX's distributed runtime, agree, share, gather.

Every process runs the same command; the processes train one model together
(each feeds its share of every global batch, see `distribute.place_batch`),
and process 0 alone prints and writes.

    job = hosts.job_from(coordinator, num_processes, process_id)  # flags, else KERAS_DISTRIBUTION_*, else the launcher
    hosts.join(job)                          # before anything touches a device
    hosts.check_same("config", config.to_dict(), fix)  # every process trains the same run
    run_dir = hosts.first("run directory", make_run_dir)  # process 0 makes it; all get its result (or its error)
    arrays = hosts.gather(variables)         # whole NumPy copies, also of arrays sharded over hosts

Small values (configs, results, errors) go through the key-value store of
JAX's coordination service, which works before any device is used; arrays go
through device collectives (`jax.experimental.multihost_utils`).

A process that dies must not leave the others waiting, nor let JAX abort them
with a page of log lines: every process of a job runs a `Liveness` thread
that writes a heartbeat to the key-value store and watches the others'. A
process silent for `--heartbeat-timeout` seconds ends the job: each survivor
prints one line naming it and the `--resume` command and exits with
`EXIT_PEER_LOST`. JAX's own heartbeat timeout is set `HEARTBEAT_SLACK`
seconds later, so this line comes first (docs/multihost.md).
"""

import atexit
import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from gemma_lora import errors
from gemma_lora.errors import ConfigError, GemmaLoraError, HostsError

# Keras' own variables for a job (keras.distribution.initialize reads them too).
COORDINATOR_VARIABLE = "KERAS_DISTRIBUTION_JOB_ADDRESSES"  # comma-separated; the first is process 0's
NUM_PROCESSES_VARIABLE = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_VARIABLE = "KERAS_DISTRIBUTION_PROCESS_ID"
AUTO = "auto"  # --coordinator auto: JAX discovers the job (Cloud TPU VMs, SLURM, Open MPI, Kubernetes)
JOIN_TIMEOUT = 300  # seconds; JAX's own default
HEARTBEAT_TIMEOUT = 100  # seconds; JAX's own default
# JAX's own deadline is set this much later than ours, so that our one line,
# not its abort, ends a process that cannot join (it overshoots its own
# deadline by about 5 s on top).
JOIN_SLACK = 30
# How long a process waits for the others once the job has assembled (a
# check, process 0's result). Long: a host may still be downloading the
# model. A process that died ends the others sooner, at the heartbeat timeout.
WAIT_TIMEOUT = 3600
# How long process 0, ending after an error, waits for the others to end first.
LEAVE_TIMEOUT = 10
# The exit code of a process that stops because another process of its job vanished
# (EX_TEMPFAIL: the job can go on, with --resume, once every host is back).
EXIT_PEER_LOST = 75
# JAX's own heartbeat timeout is this much longer than ours, so that our one
# line, not JAX's abort (exit 134, a stack trace), ends a job whose process died.
HEARTBEAT_SLACK = 20


@dataclass(frozen=True)
class Job:
    """The processes to join: process 0's coordinator (HOST:PORT), how many, and which one this is.

    None values are discovered by JAX (`--coordinator auto`, or a launcher it
    knows); `source` says where the values came from, for messages.
    """

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    source: str

    def describe(self):
        if self.coordinator is None:
            return f"a job JAX discovers ({self.source})"
        return f"process {self.process_id} of {self.num_processes} at {self.coordinator} ({self.source})"


def job_from(coordinator=None, num_processes=None, process_id=None, environ=None):
    """The `Job` this process belongs to, or None for a run of one process.

    Each value comes from its argument (the CLI's --coordinator,
    --num-processes, --process-id), else Keras' environment variables
    KERAS_DISTRIBUTION_JOB_ADDRESSES (its first address), _NUM_PROCESSES and
    _PROCESS_ID. With none of them, a launcher that started several
    processes (a SLURM step, Open MPI, a TPU pod slice that names its
    workers) makes it a job whose values JAX discovers, as does
    coordinator="auto".

    Raises:
        ConfigError: an incomplete or impossible job (naming the missing or
            bad value and the flag that sets it).
    """
    environ = os.environ if environ is None else environ
    sources = []
    if coordinator is None and environ.get(COORDINATOR_VARIABLE, "").strip():
        coordinator = environ[COORDINATOR_VARIABLE].split(",")[0].strip()
        sources.append(COORDINATOR_VARIABLE)
    if num_processes is None and environ.get(NUM_PROCESSES_VARIABLE, "").strip():
        num_processes = _integer(environ[NUM_PROCESSES_VARIABLE], NUM_PROCESSES_VARIABLE)
        sources.append(NUM_PROCESSES_VARIABLE)
    if process_id is None and environ.get(PROCESS_ID_VARIABLE, "").strip():
        process_id = _integer(environ[PROCESS_ID_VARIABLE], PROCESS_ID_VARIABLE)
        sources.append(PROCESS_ID_VARIABLE)
    source = ", ".join(sources) or "flags"
    if coordinator is None and num_processes is None and process_id is None:
        launcher = _launcher(environ)
        return Job(None, None, None, launcher) if launcher else None
    if coordinator == AUTO:
        return Job(None, num_processes, process_id, f"--coordinator auto{', ' + source if sources else ''}")
    if coordinator is None:
        raise ConfigError(
            "--num-processes/--process-id need --coordinator HOST:PORT (process 0's address, the same on every "
            "process) or --coordinator auto (on TPU VMs, SLURM, Open MPI)."
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:12355, process 0's host and a free port). "
            f"Received: {coordinator!r}."
        )
    if num_processes is None:
        raise ConfigError(f"--coordinator {coordinator} needs --num-processes N, the processes of the job.")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1. Received: {num_processes}.")
    if process_id is None:
        raise ConfigError(f"A job of {num_processes} processes needs --process-id I on each (0 to {num_processes - 1}).")
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process-id must be in 0..{num_processes - 1} for --num-processes {num_processes}. "
            f"Received: {process_id}."
        )
    if num_processes == 1:
        return None  # nothing to join
    return Job(coordinator, num_processes, process_id, source)


def _integer(text, name):
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number. Received: {text!r}.") from None


def _launcher(environ):
    """The launcher that started this process as one of several, or None."""

    def count(name):
        try:
            return int(environ.get(name, "1"))
        except ValueError:
            return 1

    # SLURM_NTASKS also covers the batch script itself, which runs once: only an srun step counts.
    if count("SLURM_STEP_NUM_TASKS") > 1 and "SLURM_PROCID" in environ:
        return "SLURM"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "TPU pod slice"
    return None


def join(job, timeout=JOIN_TIMEOUT, heartbeat_timeout=HEARTBEAT_TIMEOUT):
    """Join `job` through `jax.distributed.initialize`; call before anything touches a device.

    A process that cannot join within `timeout` seconds (no coordinator at
    the address, or some process never came) prints one line on stderr and
    ends with exit code 2: JAX's own failure is an abort with a page of log
    lines that Python cannot catch. `heartbeat_timeout` is how long a
    process may stay silent before JAX ends the job (docs/multihost.md).

    Raises:
        HostsError: JAX refuses to start the job (e.g. JAX already started
            on this process's devices).
    """
    import jax

    # CPU devices of different processes exchange data through gloo (the
    # one-machine rehearsal); GPUs and TPUs use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # No persistent compilation cache in a job: processes sharing one cache
    # directory (every localhost rehearsal, hosts on one network file system)
    # load each other's executables, and with JAX 0.12.1 on CPU the job then
    # hangs in its first shared step, idle, with nothing printed.
    jax.config.update("jax_enable_compilation_cache", False)
    where = job.coordinator or "the coordinator JAX discovers"
    this = f"process {job.process_id} of {job.num_processes}" if job.coordinator else "this process"
    message = (
        f"gemma-lora: error: {this} could not join the job at {where} within {timeout:g} s: start every process "
        "with the same --coordinator and --num-processes, check that process 0's host and port are reachable "
        "from here, or raise --coordinator-timeout."
    )
    watchdog = threading.Timer(timeout, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    heartbeat_timeout = max(heartbeat_timeout, 1.0)
    try:
        jax.distributed.initialize(
            job.coordinator, job.num_processes, job.process_id,
            initialization_timeout=round(timeout) + JOIN_SLACK,
            heartbeat_timeout_seconds=math.ceil(heartbeat_timeout) + HEARTBEAT_SLACK,
        )
    except (RuntimeError, ValueError, TypeError) as error:
        fix = (
            "Give --coordinator HOST:PORT, --num-processes and --process-id" if job.coordinator is None
            else "Join before anything uses JAX's devices (gemma_lora.hosts.join first thing in a program)"
        )
        raise HostsError(f"Cannot join {job.describe()}: {_first_line(error).rstrip('.')}. {fix}.") from None
    finally:
        watchdog.cancel()
    global _liveness
    _liveness = Liveness(_client(), process_index(), process_count(), heartbeat_timeout)
    _liveness.start()
    atexit.register(_liveness.stop)  # registered after JAX's shutdown, so it runs first


def _give_up(message):
    print(message, file=sys.stderr, flush=True)
    os._exit(2)


def process_index():
    """This process's index in its job (0 when it runs alone)."""
    state = _distributed_state()
    return state.process_id if state is not None else 0


def process_count():
    """The processes of this job (1 when it runs alone); needs no device."""
    state = _distributed_state()
    return state.num_processes if state is not None else 1


def _distributed_state():
    # JAX's record of the job it joined (None before any join, or without JAX imported: no job then).
    if "jax" not in sys.modules:
        return None
    from jax._src import distributed

    return distributed.global_state if distributed.global_state.client is not None else None


def several():
    """Whether this process belongs to a job of several processes."""
    return process_count() > 1


def is_main():
    """Whether this is process 0, the one that prints and writes."""
    return process_index() == 0


def require_joined():
    """Raise HostsError if JAX sees several processes that never joined a job (e.g. a TPU pod slice without --coordinator)."""
    import jax

    if not several() and jax.process_count() > 1:
        raise HostsError(
            f"JAX sees {jax.process_count()} processes, but this one joined no job: start every process with "
            "--coordinator auto (or HOST:PORT with --num-processes and --process-id)."
        )


_exchanges = 0  # exchanges so far; every process makes the same ones in the same order


def _key(what):
    global _exchanges
    _exchanges += 1
    return f"gemma_lora/{_exchanges}/{what.replace(' ', '_')}"


def _client():
    from jax._src import distributed

    # The key-value store and barriers of JAX's coordination service, which
    # jax.distributed.initialize started (orbax and JAX's own
    # array_serialization use it the same way); no device is involved.
    return distributed.global_state.client


def share(what, value):
    """Every process's `value` (JSON-able), in process order; [value] for a process alone.

    Every process of the job must call it, in the same order as its other
    exchanges.

    Raises:
        HostsError: some process did not arrive within `WAIT_TIMEOUT`.
    """
    if not several():
        return [value]
    key, client = _key(what), _client()
    client.key_value_set(f"{key}/{process_index()}", json.dumps(value))
    values = []
    for index in range(process_count()):
        try:
            values.append(json.loads(client.blocking_key_value_get(f"{key}/{index}", WAIT_TIMEOUT * 1000)))
        except Exception as error:  # JAX's runtime error type moved between versions
            raise HostsError(
                f"Process {index} did not reach the {what} within {WAIT_TIMEOUT} s ({_first_line(error)}); "
                "see its log."
            ) from None
    # Nobody goes on (and maybe exits, ending the coordinator with it) before everyone has read.
    _wait(client, key, what)
    return values


def barrier(what):
    """Wait until every process of the job gets here (nothing for a process alone)."""
    if several():
        _wait(_client(), _key(what), what)


def _wait(client, key, what):
    try:
        client.wait_at_barrier(f"{key}/barrier", WAIT_TIMEOUT * 1000)
    except Exception as error:
        raise HostsError(f"Not every process reached the {what} ({_first_line(error)}); see their logs.") from None


def check_same(what, value, fix):
    """Raise HostsError on every process unless all hold the same `value` (a dict is compared field by field).

    The message names what differs and where, e.g. "batch_size is 4 on
    process 0, 8 on process 1", then `fix`.
    """
    values = share(what, value)
    if all(v == values[0] for v in values):
        return
    if all(isinstance(v, dict) for v in values):
        names = sorted({name for v in values for name in v if any(w.get(name) != v.get(name) for w in values)})
        details = [
            f"{name} is " + ", ".join(f"{v.get(name)!r} on process {i}" for i, v in enumerate(values))
            for name in names
        ]
    else:
        details = [", ".join(f"{v!r} on process {i}" for i, v in enumerate(values))]
    raise HostsError(f"The processes of this job do not share the same {what}: {'; '.join(details)}. {fix}")


def first(what, fn):
    """`fn()` on process 0, its result (JSON-able) on every process; its error is raised on every process.

    Process 0's own work that the others depend on (making the run
    directory, reading a run to resume) goes through here, so that every
    process goes on, or stops with the same message, together.
    """
    if not several():
        return fn()
    outcome, failure = None, None
    if is_main():
        try:
            outcome = {"value": fn()}
        except GemmaLoraError as error:
            outcome, failure = {"error": type(error).__name__, "message": str(error)}, error
        except BaseException as error:
            outcome, failure = {"error": None, "message": f"{type(error).__name__}: {_first_line(error)}"}, error
    outcome = share(what, outcome)[0]
    if failure is not None:
        raise failure
    if "error" in outcome:
        kind = getattr(errors, outcome["error"] or "", None)
        if isinstance(kind, type) and issubclass(kind, GemmaLoraError):
            raise kind(outcome["message"])
        raise HostsError(f"Process 0 failed at the {what}: {outcome['message']}")
    return outcome["value"]


def together(what, fn):
    """`fn()` on every process, its result returned locally; if it fails on any process, it fails on all.

    For the host-local steps before the processes first work together on
    their devices (reading the data, finding the preset): one process's
    missing file would otherwise leave the others waiting. A process whose
    own call failed raises its own error; the others raise one naming it.
    """
    if not several():
        return fn()
    result, outcome, failure = None, None, None
    try:
        result = fn()
    except GemmaLoraError as error:
        outcome, failure = {"error": type(error).__name__, "message": str(error)}, error
    except BaseException as error:
        outcome, failure = {"error": None, "message": f"{type(error).__name__}: {_first_line(error)}"}, error
    outcomes = share(what, outcome)
    if failure is not None:
        raise failure
    for index, outcome in enumerate(outcomes):
        if outcome is not None:
            kind = getattr(errors, outcome["error"] or "", None)
            kind = kind if isinstance(kind, type) and issubclass(kind, GemmaLoraError) else HostsError
            raise kind(f"Process {index}: {outcome['message']}")
    return result


def from_main(what, read):
    """`read()` on process 0 -> (meta, {name: NumPy array}); every process gets both.

    `meta` (JSON-able) and any error go as in `first`; the arrays are
    broadcast from process 0's devices, in their own dtype.
    """
    if not several():
        return read()
    held = {}

    def describe():
        meta, arrays = read()
        held.update(arrays)
        return {"meta": meta, "arrays": {name: [list(a.shape), str(a.dtype)] for name, a in arrays.items()}}

    shared = first(what, describe)
    if not shared["arrays"]:
        return shared["meta"], {}
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    dtypes = {name: jnp.dtype(dtype) for name, (_, dtype) in shared["arrays"].items()}
    mine = {
        name: held[name] if is_main() else np.zeros(shape, dtypes[name])
        for name, (shape, _) in shared["arrays"].items()
    }
    arrays = multihost_utils.broadcast_one_to_all(mine)
    # Without jax_enable_x64 a 64-bit array travels as 32 bits; give each its own dtype back.
    return shared["meta"], {name: np.asarray(a).astype(dtypes[name]) for name, a in arrays.items()}


def gather(values):
    """Whole NumPy copies of JAX arrays or Keras variables, also of those sharded over several processes.

    A collective: every process must call it with the same arrays in the
    same order.
    """
    out = []
    for value in values:
        array = getattr(value, "value", value)
        if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
            out.append(np.asarray(array))
        else:
            from jax.experimental import multihost_utils

            out.append(np.asarray(multihost_utils.process_allgather(array, tiled=True)))
    return out


@contextlib.contextmanager
def whole(variables):
    """Within, each Keras variable that is sharded over several processes holds a replicated copy.

    So code that reads variables as NumPy (KerasHub's `save_lora_weights`,
    `save_to_preset`) works on every process; the sharded arrays are put
    back afterwards. A collective, like `gather`. Each copy takes the whole
    variable on every device: meant for LoRA factors, not a base model too
    large for one device.
    """
    swapped = []
    for variable in variables:
        array = variable.value
        if array.is_fully_addressable or array.is_fully_replicated:
            continue
        import jax

        replicated = array.sharding.update(spec=jax.sharding.PartitionSpec())
        # A Keras JAX variable keeps its array in `_value`; assign() would
        # lay the copy out again by the variable's own layout.
        swapped.append((variable, variable._value))
        variable._value = jax.jit(lambda x: x, out_shardings=replicated)(array)
    try:
        yield
    finally:
        for variable, value in swapped:
            variable._value = value


_liveness = None  # this process's Liveness, once it joined a job
_resume_hint = "RUN_DIR"  # the run directory, once known, for the line a lost process prints


def note_run_dir(run_dir):
    """The run directory a job trains into, named in the line printed if a process vanishes."""
    global _resume_hint
    _resume_hint = str(run_dir)


class Liveness(threading.Thread):
    """Heartbeats of this process in the key-value store, and a watch on every other process's.

    Every `interval` seconds it writes `gemma_lora/alive/I` (a counter) and
    reads the others'. A process whose counter has not moved for `timeout`
    seconds, and that did not say it ended normally (`stop`), has vanished:
    this process prints one line and exits with `EXIT_PEER_LOST`. The one
    that notices first also writes which process it was, so that every
    survivor names the same one. Losing the coordinator (process 0, which
    holds the store) is JAX's to report: its client aborts the process from
    a C++ thread the moment the connection breaks, before Python runs
    (docs/multihost.md); the line for process 0 covers a store that fails
    first.

    Python threads run while the main thread waits in a collective (JAX
    releases the GIL there), so a survivor stuck in a step with a dead peer
    is ended too.
    """

    def __init__(self, client, index, count, timeout):
        super().__init__(name="gemma-lora-liveness", daemon=True)
        self.client, self.index, self.count, self.timeout = client, index, count, timeout
        self.interval = min(max(timeout / 10, 0.1), 5.0)
        self._stopped = threading.Event()

    def run(self):
        beat = 0
        seen = {i: (None, time.monotonic()) for i in range(self.count) if i != self.index}
        while not self._stopped.is_set():
            beat += 1
            try:
                self.client.key_value_set(f"gemma_lora/alive/{self.index}", str(beat), allow_overwrite=True)
                lost = self._read("gemma_lora/lost")
            except Exception:  # the store is process 0's: it is gone
                if self._stopped.is_set():
                    return
                self._vanished(0, "the job's key-value store, which it holds, stopped answering")
            if lost is not None:
                self._vanished(int(lost))
            now = time.monotonic()
            for i, (value, since) in list(seen.items()):
                current = self._read(f"gemma_lora/alive/{i}")
                if self._read(f"gemma_lora/done/{i}") is not None:
                    del seen[i]  # ended normally
                elif current != value:
                    seen[i] = (current, now)
                elif now - since > self.timeout and not self._stopped.is_set():
                    try:
                        self.client.key_value_set("gemma_lora/lost", str(i), allow_overwrite=True)
                    except Exception:
                        pass
                    time.sleep(2 * self.interval)  # the other survivors read it before the store may go
                    self._vanished(i)
            self._stopped.wait(self.interval)

    def _read(self, key):
        try:
            return self.client.key_value_try_get(key)
        except Exception:  # not written yet
            return None

    def _vanished(self, index, how=None):
        if self._stopped.is_set():
            return
        role = " (the coordinator)" if index == 0 else ""
        how = how or f"no heartbeat for {self.timeout:g} s"
        print(
            f"gemma-lora: error: process {index} of {self.count}{role} vanished: {how} "
            "(its host died, it was killed, or the network between the hosts failed); "
            f"process {self.index} stops too. The checkpoints written so far are whole: once every host is back, "
            f"resume with `gemma-lora train --resume {_resume_hint}` and the same job flags.",
            file=sys.stderr, flush=True,
        )
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)

    def stop(self):
        """This process ends normally: say so, so the others do not take its silence for a loss."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self.client.key_value_set(f"gemma_lora/done/{self.index}", "1", allow_overwrite=True)
        except Exception:
            pass

    def await_loss(self):
        """Wait until a lost process is noticed (`_vanished` then ends this one), at most the timeout and a beat."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        while time.monotonic() < deadline and not self._stopped.is_set():
            time.sleep(self.interval)


def lost_peer(error):
    """A HostsError for a JAX runtime error in a job of several processes (a collective that failed), else None.

    A step shared with a process that died fails on the others: first the
    `Liveness` watch is given the time to name the process that vanished (it
    then ends this one with its own line); a step that failed for another
    reason gets this error.
    """
    import jax

    if not several() or not isinstance(error, jax.errors.JaxRuntimeError):
        return None
    if _liveness is not None:
        _liveness.await_loss()
    return HostsError(
        f"Process {process_index()} stopped: a step shared with the other processes failed "
        f"({_first_line(error)[:300]}). Another process has probably ended; its log says why. Resume with "
        f"`gemma-lora train --resume {_resume_hint}` and the same job flags."
    )


def leave(code):
    """End this process now with `code` if it belongs to a job of several; else return `code`.

    After an error the other processes may never reach JAX's shutdown
    barrier, where a normal exit would wait for them (up to JAX's shutdown
    timeout) and then abort with a page of log lines: the one line already
    printed should stay the last. Process 0, which holds the coordinator,
    leaves last (waiting at most `LEAVE_TIMEOUT` for the others): a process
    that saw the coordinator vanish would be aborted by JAX, log and all.
    """
    if not several():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    if _liveness is not None:
        _liveness.stop()
    try:
        client = _client()
        if is_main():
            deadline = time.monotonic() + LEAVE_TIMEOUT
            for index in range(1, process_count()):
                wait = max(int((deadline - time.monotonic()) * 1000), 1)
                client.blocking_key_value_get(f"gemma_lora/left/{index}", wait)
            time.sleep(0.5)  # the others' own exits, just after they said so
        else:
            client.key_value_set(f"gemma_lora/left/{process_index()}", str(code))
    except Exception:  # a process that died, or is stuck in a step, does not say goodbye
        pass
    os._exit(code)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
