"""How far a command's work is and when it will end: a bar on a terminal, plain periodic lines in a log.

Shared core of the commands' progress reporting.  On a terminal the bar is tqdm's (the optional ``progress``
extra), drawn on stdout beside the command's own lines; when stdout is not a terminal, or tqdm is not
installed, the same figures come as plain lines, few enough that a log of a survey stays readable.

* :class:`StageProgress`: one training stage, its ETA from the iteration limit or the time budget, whichever
  is nearer (the stage appends :meth:`StageProgress.eta_text` to its interval line).
* :class:`FileProgress`: anna-infer's and anna-pack's input files (files, spectra, spectra/s, ETA; the line
  per finished file only with ``--verbose``), or the spectra of anna-test and anna-synth.  It is the stage's
  ``report`` callable; :func:`announce_total` and :func:`count_done` are the two calls a stage makes, and they
  fall back to plain reporting for any other ``report`` (a list's ``append`` in tests, ``print``).
"""

import sys
import time

# Plain lines (no terminal, or no tqdm): none for work done within QUIET_SECONDS, then one at each tenth of the
# work and at least every PERIOD_SECONDS.
QUIET_SECONDS = 5.0
PERIOD_SECONDS = 30.0
STEPS = 10


def load_tqdm():
    """tqdm's class, or None when it is not installed (the commands then print plain lines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def format_duration(seconds):
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``: an ETA as a person reads it."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Display:
    """Where lines and the bar go: ``report`` for lines; a tqdm bar on ``stream`` only when it is a terminal."""

    def __init__(self, report, stream):
        self.report = report
        self.stream = stream if stream is not None else sys.stdout
        self.tqdm = load_tqdm() if _is_terminal(self.stream) else None
        self.bar = None

    def line(self, text):
        if self.bar is not None:
            with self.tqdm.external_write_mode(file=self.stream):
                self.report(text)
        else:
            self.report(text)

    def open_bar(self, **options):
        if self.tqdm is not None:
            self.bar = self.tqdm(file=self.stream, dynamic_ncols=True, leave=False, **options)
        return self.bar

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class StageProgress:
    """One training stage: a bar (iterations, it/s, ETA) on a terminal, and the ETA for the interval lines.

    ``total`` the stage's iteration limit, ``max_seconds`` its time budget (None: none), ``start_iteration``
    where a resumed stage starts.  The ETA is the nearer of the two ends: the iterations left at the rate of
    this run, and the time budget left."""

    def __init__(self, report, stage, total, max_seconds=None, start_iteration=0, stream=None,
                 clock=time.perf_counter):
        self.display = _Display(report, stream)
        self.stage, self.total, self.max_seconds = stage, total, max_seconds
        self.start_iteration = start_iteration
        self.clock = clock
        self.started = clock()
        self.display.open_bar(total=total, initial=start_iteration, desc=f"stage {stage}", unit="it",
                              bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")

    def eta(self, iteration, elapsed):
        """(seconds left, what ends the stage: "iterations" or "time limit"), or None before a rate is known.

        ``elapsed``: the stage's seconds so far, a resumed run's earlier ones included (its time budget)."""
        done = iteration - self.start_iteration
        spent = self.clock() - self.started
        by_iterations = (self.total - iteration) * spent / done if done > 0 and spent > 0 else None
        by_time = self.max_seconds - elapsed if self.max_seconds is not None else None
        if by_time is not None and (by_iterations is None or by_time < by_iterations):
            return max(by_time, 0.0), "time limit"
        return (by_iterations, "iterations") if by_iterations is not None else None

    def eta_text(self, iteration, elapsed):
        """`` | ETA 3 min 20 s`` (`` (time limit)`` when the budget ends the stage first); empty when unknown
        or when the stage is done."""
        eta = self.eta(iteration, elapsed)
        if eta is None or iteration >= self.total:
            return ""
        seconds, end = eta
        return f" | ETA {format_duration(seconds)}" + (" (time limit)" if end == "time limit" else "")

    def tick(self, iteration, elapsed):
        bar = self.display.bar
        if bar is not None:
            bar.n = iteration
            eta = self.eta(iteration, elapsed)
            bar.set_postfix_str(f"ETA {format_duration(eta[0])}" if eta else "", refresh=False)
            bar.refresh()

    def line(self, text):
        self.display.line(text)

    def close(self):
        self.display.close()


class FileProgress:
    """Progress over a command's inputs, used as its ``report``: ``progress(text)`` prints a line.

    ``unit`` "file" counts files and the spectra in them (anna-infer, anna-pack); "spectrum" counts spectra
    alone (anna-synth).  On a terminal with tqdm: one bar (files, spectra, spectra/s, ETA).  Otherwise, once
    the work has taken :data:`QUIET_SECONDS`: a plain line at each tenth of the work, and when
    :data:`PERIOD_SECONDS` have passed without one.  Either way a closing line with the totals and the rate.  ``verbose`` also prints
    the line of every finished file."""

    def __init__(self, prog, verbose=False, report=print, stream=None, unit="file", clock=time.monotonic,
                 period=PERIOD_SECONDS, quiet_seconds=QUIET_SECONDS):
        self.prog, self.verbose, self.unit, self.clock = prog, verbose, unit, clock
        self.period, self.quiet_seconds = period, quiet_seconds
        self.display = _Display(report, stream)
        self.total = None
        self.done = self.spectra = 0
        self.started = self.last_line = None
        self.next_step = 1

    def __call__(self, text):
        self.display.line(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(summary=exc[0] is None)
        return False

    def start(self, total):
        """``total`` files (or spectra) are to come."""
        self.total = total
        self.started = self.last_line = self.clock()
        if total:
            self.display.open_bar(total=total, desc=self.prog, unit=self.unit, unit_scale=self.unit != "file")

    def advance(self, n_spectra, text=None, items=None):
        """One more file done (``items`` more spectra for unit "spectrum"), holding ``n_spectra`` spectra;
        ``text`` is its line, printed with ``verbose``."""
        if self.started is None:
            self.start(0)
        items = (1 if self.unit == "file" else n_spectra) if items is None else items
        self.done += items
        self.spectra += n_spectra
        if self.verbose and text:
            self.display.line(text)
        bar = self.display.bar
        if bar is not None:
            if self.unit == "file":
                bar.set_postfix_str(f"{self.spectra:,} spectra, {self._rate():,.0f} spectra/s", refresh=False)
            bar.update(items)
            return
        now = self.clock()
        if now - self.started < self.quiet_seconds:
            return
        step_reached = self.total and self.done >= self.next_step * self.total / STEPS
        if step_reached or now - self.last_line >= self.period:
            while self.total and self.done >= self.next_step * self.total / STEPS:
                self.next_step += 1
            if not (self.total and self.done >= self.total):  # the closing line says the last
                self.display.line(self.status_line())
            self.last_line = now

    def _rate(self):
        elapsed = self.clock() - self.started
        return self.spectra / elapsed if elapsed > 0 else 0.0

    def _count(self):
        of = f"/{self.total:,}" if self.total else ""
        if self.unit == "file":
            return f"{self.done:,}{of} files, {self.spectra:,} spectra"
        return f"{self.done:,}{of} spectra"

    def status_line(self):
        """``anna-infer: 12/40 files, 1,234 spectra, 567 spectra/s, ETA 1 min 05 s``."""
        elapsed = self.clock() - self.started
        eta = ""
        if self.total and 0 < self.done < self.total and elapsed > 0:
            eta = f", ETA {format_duration((self.total - self.done) * elapsed / self.done)}"
        return f"{self.prog}: {self._count()}, {self._rate():,.0f} spectra/s{eta}"

    def close(self, summary=True):
        self.display.close()
        if summary and self.started is not None and self.done:
            elapsed = self.clock() - self.started
            count = (f"{_files(self.done)}, {self.spectra:,} spectra" if self.unit == "file"
                     else f"{self.spectra:,} spectra")
            self.display.line(f"{self.prog}: {count} in {elapsed:.1f} s ({self._rate():,.0f} spectra/s)")
        self.started = None


def _files(n):
    return f"{n} file" + ("" if n == 1 else "s")


def announce_total(report, total):
    """Tell ``report`` how many files (or spectra) are to come, when it is a :class:`FileProgress`."""
    if isinstance(report, FileProgress):
        report.start(total)


def count_done(report, n_spectra, text=None):
    """A file (or ``n_spectra`` spectra) is done: ``text`` is its line, printed by a plain ``report``; a
    :class:`FileProgress` counts it."""
    if isinstance(report, FileProgress):
        report.advance(n_spectra, text)
    elif text:
        report(text)
