"""Progress of long work: one bar on a terminal, a plain line every ~10 s in a log.

    progress = Progress(total=25, label="training", unit="step")
    for ...:
        progress.update(token_loss=2.31)
    progress.close()

The line is formatted by tqdm (`tqdm.format_meter`: count, elapsed, rate,
remaining time). For training steps the rate it is given is the median time
per step after the first, not tqdm's running average: the first step
includes the compilation (30 s against 2 s per step on a real model), and a
mean would promise an hour for a seven-minute run; steps that compile a new
batch shape are outliers the median ignores too. Other work (rows scored or
answered, tensors converted) arrives in bursts, so its rate is the plain
average.

In a log (not a terminal) a line is written once the work has run ~10 s,
then every ~10 s and at the end, so quick work writes nothing.
"""

import statistics
import sys
import time

from tqdm import tqdm

# A log gets a line at most this often (and at the end); a terminal redraws in place.
LOG_INTERVAL = 10.0
TERMINAL_INTERVAL = 0.2


_muted = False  # set by `mute` in the processes of a job other than process 0


def mute():
    """Show no progress from this process from now on (a job's processes other than process 0)."""
    global _muted
    _muted = True


class Progress:
    """Counts units of work towards `total` and shows how far along they are.

    Args:
        total: int, units the work will take.
        label: str, what is being done ("training", "answering test rows").
        unit: str, the unit's name ("step", "row").
        stream: file to write to (default: sys.stdout, read at each write).
        enabled: False shows nothing (e.g. inside a library call).
        robust_rate: rate from the median time per unit after the first
            (default for unit "step"), else the average.
    """

    def __init__(self, total, label, unit="step", stream=None, enabled=True, robust_rate=None):
        self.total, self.label, self.unit = total, label, unit
        self.robust_rate = unit == "step" if robust_rate is None else robust_rate
        self.stream = stream
        self.enabled = enabled and not _muted
        self.n = 0
        self.postfix = {}
        self.start = self.last = time.perf_counter()
        self.durations = []  # seconds per unit, from the second unit on
        self.shown = None
        self.closed = False
        self._show()

    @property
    def _out(self):
        return self.stream or sys.stdout

    def update(self, n=1, **postfix):
        """Count `n` more units done; `postfix` values (e.g. token_loss=2.3) show after the bar."""
        now = time.perf_counter()
        if self.n > 0 and n:
            self.durations.extend([(now - self.last) / n] * n)
        self.n += n
        self.last = now
        self.postfix.update(postfix)
        self._show(final=self.n >= self.total)

    def close(self):
        """Show the final line (once)."""
        if not self.closed:
            self._show(final=True)
            self.closed = True

    def rate(self):
        """Units per second, or None before there is a measure of it."""
        if not self.robust_rate:
            elapsed = self.last - self.start
            return self.n / elapsed if self.n and elapsed > 0 else None
        if not self.durations:
            return None
        median = statistics.median(self.durations[-50:])
        return 1.0 / median if median > 0 else None

    def line(self):
        postfix = ", ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        if self.n == 0 and self.unit == "step":
            # Compiled, or loaded from the persistent compilation cache on a second run.
            postfix = "the first step compiles or loads" + (f", {postfix}" if postfix else "")
        return tqdm.format_meter(
            self.n, self.total, time.perf_counter() - self.start, prefix=self.label,
            unit=self.unit, rate=self.rate() or 0, postfix=postfix or None, ncols=100,
        )

    def _show(self, final=False):
        if not self.enabled or self.closed:
            return
        now = time.perf_counter()
        terminal = getattr(self._out, "isatty", lambda: False)()
        if terminal:
            due = self.shown is None or now - self.shown >= TERMINAL_INTERVAL
        else:
            # A log line at the start only for training (the first step may
            # compile for a while), then every LOG_INTERVAL, and at the end
            # only if a line came before.
            first = self.shown is None and (self.unit == "step" or now - self.start >= LOG_INTERVAL)
            due = first or (self.shown is not None and (final or now - self.shown >= LOG_INTERVAL))
        if not (due or (final and terminal and self.shown is not None)):
            if final:
                self.closed = True
            return
        self.shown = now
        if terminal:
            self._out.write("\r" + self.line().ljust(100) + ("\n" if final else ""))
        else:
            self._out.write(self.line() + "\n")
        self._out.flush()
        if final:
            self.closed = True


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)
