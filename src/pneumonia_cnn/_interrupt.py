"""Ctrl-C while the command line is still importing torch (about a second and a half): before ``main`` and its
handler run, Python printed a KeyboardInterrupt traceback through torch's import machinery."""
from __future__ import annotations

import contextlib
import os
import signal
import sys


@contextlib.contextmanager
def quiet_interrupt_while_importing():
    """For the ``pneumonia-cnn`` program and ``python -m pneumonia_cnn`` only (whose ``sys.argv[0]`` is "-m" while
    the package is imported): a library user's interrupt stays a KeyboardInterrupt."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    previous = None
    if program in ("pneumonia-cnn", "-m"):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous = signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    try:
        yield
    finally:
        if program in ("pneumonia-cnn", "-m") and signal.getsignal(signal.SIGINT) is not previous:
            with contextlib.suppress(ValueError, TypeError):  # a handler set from C reads as None: Python's default
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


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
