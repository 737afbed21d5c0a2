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
