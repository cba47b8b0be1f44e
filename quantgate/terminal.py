"""The terminal of `quantgate run`: one progress bar per recipe (a line per step where the output is
not a terminal) and quantgate's warnings. While the flow runs, whatever else is printed (library
progress bars, warnings, Prefect's own lines) goes to the run's log instead (quantgate.runlog)."""
from __future__ import annotations

import io
import logging
import sys
from contextlib import contextmanager

from tqdm import tqdm

from quantgate.record import STEPS

MODEL_STEPS = ("download", "reference", "benchmark")
output = logging.getLogger("output")  # what was printed to stdout or stderr, line by line


class LogStream(io.TextIOBase):
    """A text stream whose lines become log records; a bar redrawn with carriage returns keeps its last state."""

    def __init__(self, name: str):
        self.name, self.pending, self.writing = name, "", False

    def write(self, text: str) -> int:
        if self.writing:  # a handler that writes to this stream while it logs: drop, never loop
            return len(text)
        self.writing = True
        try:
            self._lines(text)
        finally:
            self.writing = False
        return len(text)

    def _lines(self, text: str) -> None:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        self.pending = self.pending.rsplit("\r", 1)[-1]
        for line in lines:
            if line := line.rsplit("\r", 1)[-1].strip():
                output.info("%s: %s", self.name, line)

    def writable(self) -> bool:
        return True


class Bars(logging.Handler):
    """The progress records as bars, one per group (the model, each recipe), quantgate's warnings as lines above them.
    A group's bar stays while one of its steps runs, so recipes gated side by side each have theirs; an idle group's
    bar is closed when another group starts a step, and drawn again, its count kept, when it starts its next."""

    def __init__(self, stream):
        super().__init__(logging.INFO)
        self.stream, self.tty = stream, stream.isatty()
        self.bars: dict[str, tqdm] = {}
        self.running: set[str] = set()  # groups with a step started and not yet ended (a group runs one at a time)
        self.counts: dict[str, tuple[int, int]] = {}  # steps ended, and steps in all, by group

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event is None:
            if record.levelno >= logging.WARNING:
                self.line(f"{record.levelname.lower()}: {record.getMessage()}")
            elif getattr(record, "terminal", False):  # a step's milestone (converted, measured, published)
                self.line(f"  {record.getMessage()}")
        elif event == "run":
            self.line(record.getMessage())
        elif event == "start":
            self.start(record.group, record.step)
        else:
            self.end(record)

    def line(self, text: str) -> None:
        tqdm.write(text, file=self.stream)

    def start(self, group: str, step: str) -> None:
        for idle in [g for g in self.bars if g != group and g not in self.running]:
            self.bars.pop(idle).close()
        done, total = self.counts.get(group, (0, len(MODEL_STEPS if group == "model" else STEPS)))
        if group != "model" and step not in STEPS:  # a step only some configs run (adapters)
            total += 1
        self.counts[group] = done, total
        self.running.add(group)
        if group not in self.bars:
            self.bars[group] = tqdm(total=total, initial=done, desc=f"{group:<26}", file=self.stream,
                                    disable=not self.tty, leave=True,
                                    bar_format="{desc} {bar:12} {n_fmt}/{total_fmt} steps [{elapsed}] {postfix}")
        self.bars[group].total = total
        self.bars[group].set_postfix_str(f"{step}...")

    def end(self, record: logging.LogRecord) -> None:
        group, done = record.group, f"{record.step} {record.status} ({record.seconds:.1f} s)"
        self.running.discard(group)
        finished, total = self.counts.get(group, (0, 0))
        self.counts[group] = finished + 1, total
        if self.tty and group in self.bars:
            self.bars[group].update(1)
            self.bars[group].set_postfix_str(done + (f": {record.reason[:80]}" if record.reason else ""))
        else:
            self.line(f"{group:<26} {done}" + (f": {record.reason[:160]}" if record.reason else ""))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextmanager
def quiet(stream=None):
    """Show only progress and quantgate's warnings on `stream` (stderr) while the block runs."""
    stream = stream or sys.stderr
    bars = Bars(stream)
    quantgate = logging.getLogger("quantgate")
    # Handlers already writing to the terminal: Prefect's console (root, uvicorn), torch's own.
    loggers = [logging.getLogger(),
               *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    consoles = list({id(h): h for lg in loggers for h in lg.handlers
                     if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}.values())

    def mute(record):
        return False

    for handler in consoles:
        handler.addFilter(mute)
    quantgate.addHandler(bars)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = LogStream("stdout"), LogStream("stderr")
    try:
        yield bars
    finally:
        sys.stdout, sys.stderr = saved
        bars.close()
        quantgate.removeHandler(bars)
        for handler in consoles:
            handler.removeFilter(mute)
