"""Process signals, in one place: Ctrl-C while the command line imports torch; SIGTERM unwinding a command as
Ctrl-C does; and ``StopSignals``, with which the long-running commands (``train``, ``listen``, ``pacs --watch``)
note a stop signal and end where they can end cleanly.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("pneumonia_cnn")


@contextlib.contextmanager
def quiet_interrupt_while_importing():
    """Ctrl-C or SIGTERM while the command line is still importing torch (about a second and a half, more on a
    busy machine): before ``main`` and its handlers ran, Ctrl-C printed a KeyboardInterrupt traceback through
    torch's import machinery, and SIGTERM ended the process without a word. Now each says its one line, as once
    the command runs ("interrupted", exit 130; "terminated (SIGTERM)", ended by the signal). For the
    ``pneumonia-cnn`` program and ``python -m pneumonia_cnn`` only (whose ``sys.argv[0]`` is "-m" while the
    package is imported): a library user's signals stay theirs."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    handlers = {signal.SIGINT: _interrupted_while_importing, signal.SIGTERM: _terminated_while_importing}
    previous = {}
    # the command line's own modules import more while ``__main__`` runs, when argv[0] names it
    if program in ("pneumonia-cnn", "-m") or sys.argv[0].endswith(os.path.join("pneumonia_cnn", "__main__.py")):
        for number, handler in handlers.items():
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, before in previous.items():
            if signal.getsignal(number) is handlers[number]:
                default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
                with contextlib.suppress(ValueError, TypeError):  # a handler set from C reads as None: the default
                    signal.signal(number, before if before is not None else default)


def _interrupted_while_importing(_number, _frame):
    with contextlib.suppress(OSError):  # a closed stderr: the status still says it
        os.write(2, b"interrupted\n")  # as a Ctrl-C once the command runs says (it ended without a word)
    os._exit(130)


def _terminated_while_importing(_number, _frame):
    with contextlib.suppress(OSError):
        os.write(2, b"terminated (SIGTERM)\n")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # then ended by the signal itself, as its parent expects
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred(numbers=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM noted, not acted on, inside the block; once it has ended, the previous handlers are back
    and each noted signal is raised again (Ctrl-C then interrupts, SIGTERM terminates, as they would have). A
    Python-level handler, not ``pthread_sigmask``: that masks the calling thread only, and the kernel hands a
    process's signal to any thread that does not mask it (torch's among them)."""
    noted, previous = [], {}
    for number in numbers:
        with contextlib.suppress(ValueError):  # not the main thread: signals are the caller's
            previous[number] = signal.signal(number, lambda got, _frame: noted.append(got))
    try:
        yield
    finally:
        for number, handler in previous.items():
            default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
            with contextlib.suppress(ValueError, TypeError):  # a handler set from C reads as None: the default
                signal.signal(number, handler if handler is not None else default)
        for number in dict.fromkeys(noted):
            signal.raise_signal(number)


def map_with_signals_deferred(pool, function, items, chunk: int = 32):
    """``pool.map(function, items)``'s results in order, submitted and awaited ``chunk`` at a time with SIGINT
    and SIGTERM deferred (acted on between chunks, a fraction of a second apart). A Ctrl-C raised inside
    ``concurrent.futures``' own locks (a future's condition, the pool's idle semaphore) can leave one taken:
    the workers then wait on it for ever, and so did the pool's shutdown (``predict`` hung after Ctrl-C in 1
    of 6 runs, at 0 % CPU)."""
    items = list(items)
    for start in range(0, len(items), chunk):
        with signals_deferred():
            done = list(pool.map(function, items[start:start + chunk]))
        yield from done


def exit_quietly_once_done(status: int) -> None:
    """After ``main`` has returned, its work done and said: Ctrl-C during the interpreter's exit (torch's atexit
    handlers, joining threads) ends the process at once with ``main``'s status. It raised a KeyboardInterrupt
    there, outside every handler: a traceback, and the process ended by the signal as if interrupted mid-work."""
    with contextlib.suppress(ValueError):  # not the main thread: signals are the caller's
        signal.signal(signal.SIGINT, lambda _number, _frame: end_process_now(status))


def end_process_now(status: int) -> None:
    """Ends the process with ``status`` once what was said is flushed, without the interpreter's finalisation
    (atexit handlers, the garbage collector's last pass, joining threads). No ``logging.shutdown()``: this also
    runs as a SIGINT handler, where taking a handler's lock that the interrupted code holds would hang; the
    package logs to streams only, flushed on each record."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or full stream: nothing more can be said anyway
            stream.flush()
    os._exit(status)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command: unwinds as Ctrl-C does (temporary files removed, transactions rolled back,
    locks released), so that it subclasses KeyboardInterrupt; then the process ends by the signal."""


@contextlib.contextmanager
def sigterm_unwinds():
    """While a command runs in the main thread, SIGTERM raises ``Terminated`` instead of killing the process
    where it stands (it left no line, and could leave an output's temporary file behind). A second SIGTERM
    kills at once. Commands that stop gracefully (``serve``, ``listen``, ``pacs --watch``, ``train``) install
    their own handlers inside this one."""
    def unwind(_number, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated
    try:
        previous = signal.signal(signal.SIGTERM, unwind)
    except ValueError:  # not the main thread: signals are the caller's
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, TypeError):  # a handler set from C reads as None: the default
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def end_by_sigterm() -> None:
    """After ``Terminated`` has unwound and been reported: end the process by SIGTERM itself, so that its parent
    (a shell, systemd, torchrun) sees what it saw before, a process ended by the signal (status -15 / 143)."""
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class Stopped(Exception):
    """A stop signal came while a job waited (a retry's back-off, the pause between polls)."""


class StopSignals:
    """SIGTERM (systemd's stop) and SIGINT (Ctrl-C) noted while a long job runs (``with StopSignals() as stop``),
    not acted on at once: the job checks ``stop`` where it can end cleanly (after the step or the instance in
    hand, between polls), ``pause`` ends its waits early, and ``wait`` blocks until one comes. A second signal
    interrupts at once: ``Terminated`` for SIGTERM, KeyboardInterrupt for Ctrl-C. ``announce`` (a format string
    for the signal's name) is logged when the first comes. Installed from the main thread only (elsewhere the
    job ends on its own); the previous handlers are restored on exit."""

    def __init__(self, numbers=(signal.SIGTERM, signal.SIGINT), announce: str | None = None):
        self.numbers, self.announce = tuple(numbers), announce
        self.signal: str | None = None  # the first stop signal's name
        self.noted = threading.Event()
        self._previous: dict = {}

    def __enter__(self):
        for number in self.numbers:
            with contextlib.suppress(ValueError):  # not the main thread: the job ends on its own
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
            with contextlib.suppress(ValueError, TypeError):  # a handler set from C reads as None: the default
                signal.signal(number, previous if previous is not None else default)
        self._previous = {}

    def _note(self, number, _frame) -> None:
        if self.signal is not None:  # a second signal: at once
            raise Terminated if number == signal.SIGTERM else KeyboardInterrupt
        self.signal = signal.Signals(number).name
        self.noted.set()
        if self.announce:
            log.warning(self.announce, self.signal)

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self, name: str) -> None:
        """A stop that came to another process (a torchrun rank's signal): as if a signal ``name`` had come."""
        if self.signal is None:
            self.signal = name
            self.noted.set()

    def wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for a stop signal; True once one has come."""
        return self.noted.wait(seconds)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (at most half a second at a time); raises ``Stopped`` once a stop signal has come."""
        left = seconds
        while not self.signal:
            if left <= 0:
                return
            step = min(0.5, left)
            time.sleep(step)
            left -= step
        raise Stopped(self.signal)
