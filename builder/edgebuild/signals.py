"""SIGTERM and SIGHUP stop a command the way Ctrl-C does, so its clean-up runs.

Python turns only SIGINT into an exception (KeyboardInterrupt); SIGTERM — what a container
runtime, systemd or a CI job sends to stop a process — and SIGHUP (the terminal went away) kill
it outright by default, and every ``finally`` and ``TemporaryDirectory`` is skipped: a stopped
``pack`` left tens of MB of candidate models in ``$TMPDIR/edgebuild-*``. Here all three raise
:class:`Stopped`, a KeyboardInterrupt, so they take the same path: temporary directories are
removed and a half-written bundle is never moved into place. The command then exits with
128 + the signal number, as a shell reports a process killed by that signal (130 SIGINT,
129 SIGHUP, 143 SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# The signals the running ``stop_cleanly`` block received. The exception a handler raises can be lost:
# raised while Python runs a weakref callback or a ``__del__`` (garbage collection can start anywhere),
# it is printed as "Exception ignored" and the block runs on. So the steps that publish a result check
# here too (``raise_if_stopped``) instead of trusting the exception alone.
_received: list[int] = []


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_cleanly(prog: str, what: str) -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM/SIGHUP raising :class:`Stopped`; after the block's own
    clean-up, a stop is one line on stderr and exit code 128 + the signal number."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    received = _received
    received.clear()

    def stop(signum: int, frame: FrameType | None) -> None:
        # A second signal must not interrupt the clean-up the first one started.
        for sig in CAUGHT:
            signal.signal(sig, signal.SIG_IGN)
        received.append(signum)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in CAUGHT}
    try:
        yield
    except BaseException:
        # Whatever the interruption became on its way up (an extension module being imported
        # turns it into ImportError), the stop is what happened.
        if not received:
            raise
        signum = received[0]
        click.echo(f"{prog}: stopped by {signal.Signals(signum).name}: {what}", err=True)
        raise click.exceptions.Exit(128 + signum) from None
    finally:
        received.clear()
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be restored
                signal.signal(sig, handler)


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` if the running ``stop_cleanly`` block was asked to stop, also when the
    exception its handler raised was lost on the way: called right before a result is published."""
    if _received:
        raise Stopped(_received[0])
