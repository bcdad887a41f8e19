"""A command's whole output in a log file, and only what its user follows on the console.

Ray, Tune, wandb and the trial workers (whose output Ray forwards to the driver) print a great deal,
partly from C++ straight to file descriptors 1 and 2. Inside `output_to_log` both descriptors (and
sys.stdout / sys.stderr) write to the log, so all of it is kept there and none reaches the terminal;
the `Console` it yields writes to the terminal and to the log alike; `active_console()` finds it from
code that cannot be handed it (Tune pickles its callbacks and searcher with the experiment, and a
resumed search unpickles them).
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path


class Console:
    """Lines for the user: written to the terminal (stdout, or stderr with error=True) and to the log."""

    def __init__(self, out, err, log):
        self.out, self.err, self.log = out, err, log

    def print(self, *parts, sep: str = " ", error: bool = False) -> None:
        text = sep.join(map(str, parts)) + "\n"
        for stream in (self.err if error else self.out, self.log):
            stream.write(text)
            stream.flush()


_active: Console | None = None  # the Console of the output_to_log block this process is in


def active_console() -> Console | None:
    """The Console of the output_to_log block running now, or None outside one."""
    return _active


@contextmanager
def output_to_log(path: Path):
    """Within the block everything written to stdout or stderr, by Python or by native code, goes to
    path (appended); yields the Console. An exception leaving the block is written to the log with its
    traceback, then re-raised once the terminal is back (a UserError still becomes one line there)."""
    global _active
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    out, err = (os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace") for fd in saved)
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        _active = Console(out, err, log)
        yield _active
    except BaseException:
        log.write(traceback.format_exc())
        raise
    finally:
        _active = None
        log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        sys.stdout, sys.stderr = streams
        for closing in (out, err, log):
            closing.close()
        for fd in saved:
            os.close(fd)
