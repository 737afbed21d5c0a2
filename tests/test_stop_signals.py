"""``StopSignals``: the one way ``train``, ``listen`` and ``pacs --watch`` note a stop signal (they had three
classes of their own, which differed on a second signal and on restoring handlers set from C)."""
import logging
import os
import signal
import threading
import time

import pytest

from pneumonia_cnn.signals import Stopped, StopSignals, Terminated


def send(number):
    os.kill(os.getpid(), number)
    time.sleep(0.2)  # the handler runs in this (the main) thread at its next instruction


def test_the_first_signal_is_noted_and_announced_the_second_interrupts_at_once(caplog):
    caplog.set_level(logging.WARNING)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals(announce="received %s: finishing") as stop:
        assert not stop and not stop.requested and not stop.wait(0.01)
        send(signal.SIGTERM)
        assert stop.signal == "SIGTERM" and stop and stop.requested and stop.wait(0)
        assert caplog.messages == ["received SIGTERM: finishing"]
        with pytest.raises(Stopped, match="SIGTERM"):
            stop.pause(5)
        with pytest.raises(Terminated):  # a second SIGTERM: unwinds as the command line's SIGTERM does
            send(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt) as second_ctrl_c:
            send(signal.SIGINT)
        assert type(second_ctrl_c.value) is KeyboardInterrupt
        assert stop.signal == "SIGTERM"  # the first one's name stays
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_ctrl_c_first_then_only_the_signals_asked_for(caplog):
    with StopSignals() as stop:
        send(signal.SIGINT)
        assert stop.signal == "SIGINT"
    with StopSignals([signal.SIGTERM]) as stop:  # listen: Ctrl-C stays a KeyboardInterrupt at once
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
        assert not stop


def test_a_pause_sleeps_its_time_unless_stopped_and_a_request_from_another_rank_counts():
    with StopSignals() as stop:
        started = time.monotonic()
        stop.pause(0.3)
        assert 0.3 <= time.monotonic() - started < 2
        stop.request("another rank's stop signal")
        assert stop.requested and stop.signal == "another rank's stop signal"
        with pytest.raises(Stopped):
            stop.pause(5)


def test_outside_the_main_thread_no_handler_is_installed():
    before, entered = signal.getsignal(signal.SIGTERM), []

    def enter():
        with StopSignals() as stop:
            entered.append(signal.getsignal(signal.SIGTERM) is before and not stop)
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(10)
    assert entered == [True]


def test_a_handler_that_was_set_from_c_comes_back_as_the_default(monkeypatch):
    """signal.signal() returns None for a handler installed from C: putting None back raised TypeError (the
    training loop's own class did exactly that)."""
    real = signal.signal
    calls = []

    def from_c(number, handler):
        calls.append((number, handler))
        real(number, handler)
        return None
    monkeypatch.setattr(signal, "signal", from_c)
    previous = real(signal.SIGTERM, signal.SIG_DFL)
    try:
        with StopSignals():
            pass
        assert calls[-2:] == [(signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)]
    finally:
        real(signal.SIGTERM, previous)


LATE_CTRL_C = """
import atexit, sys, time
from pneumonia_cnn import cli
def work_done():
    print("done", flush=True)
    return {status}
cli.main = work_done
atexit.register(time.sleep, 5)  # the interpreter's exit, as torch's atexit handlers or a thread being joined
raise SystemExit(cli.entry())
"""


@pytest.mark.parametrize("status", [0, 2])
def test_ctrl_c_after_the_command_ended_exits_with_its_status_and_no_traceback(status):
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-c", LATE_CTRL_C.format(status=status)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "done\n"
        time.sleep(0.5)  # in the 5 s of the exit
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == status and time.monotonic() - started < 4  # at once, not after the 5 s
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


TORCHRUN_PROCESS_ENDS = """
import atexit, logging, sys
from pneumonia_cnn import cli
def work_done():
    sys.stdout.write("done, unflushed")
    logging.getLogger("pneumonia_cnn").warning("said last")
    return 3
cli.main = work_done
atexit.register(print, "finalised", file=sys.stderr)  # stands for a Gloo worker taking the GIL at finalisation
raise SystemExit(cli.entry())
"""


@pytest.mark.parametrize("world_size", ["2", "1", None])
def test_a_process_torchrun_started_ends_without_finalisation_and_with_what_it_said(world_size):
    """A Gloo worker thread still releasing the last collective's tensors took the GIL during the interpreter's
    finalisation: SIGABRT ("terminate called without an active exception"), and torchrun failed the job (10 of 70
    2-process stops here). A process torchrun started (WORLD_SIZE above 1) now ends at once after ``main``."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONUNBUFFERED")}  # stdout buffered
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    result = subprocess.run([sys.executable, "-c", TORCHRUN_PROCESS_ENDS], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 3 and result.stdout == "done, unflushed"
    assert "said last" in result.stderr
    assert ("finalised" in result.stderr) == (world_size != "2")


def test_a_ctrl_c_while_a_pool_decodes_is_acted_on_between_chunks_and_the_pool_still_shuts_down():
    """A Ctrl-C raised inside ``concurrent.futures``' locks could leave one taken: ``predict`` then hung at
    0 % CPU in the pool's shutdown. Now the chunk in hand is finished first, then the KeyboardInterrupt comes
    with no lock held: every item of the chunk was done, none of the next, and the pool shuts down."""
    from concurrent.futures import ThreadPoolExecutor

    from pneumonia_cnn.signals import map_with_signals_deferred
    done = []

    def work(item):
        if item == 0:
            signal.raise_signal(signal.SIGINT)  # from a worker thread: the main thread's handler runs next
        time.sleep(0.1)
        done.append(item)
        return item * 10

    pool = ThreadPoolExecutor(max_workers=2)
    results = []
    with pytest.raises(KeyboardInterrupt):
        for result in map_with_signals_deferred(pool, work, range(12), chunk=6):
            results.append(result)
    assert sorted(done) == [0, 1, 2, 3, 4, 5] and results == []  # raised before the chunk's first result
    worker = threading.Thread(target=pool.shutdown)
    worker.start()
    worker.join(5)
    assert not worker.is_alive()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert list(map_with_signals_deferred(ThreadPoolExecutor(2), abs, [-3, 2, -1], chunk=2)) == [3, 2, 1]


def test_the_decoding_pools_of_predict_the_cache_and_fingerprints_map_with_signals_deferred(monkeypatch, tmp_path):
    """Each pool in the main thread goes through ``map_with_signals_deferred`` (the hang above came from a plain
    ``pool.map`` in predict's decoding)."""
    import numpy as np
    from PIL import Image

    from pneumonia_cnn import signals
    from pneumonia_cnn.data import cache, fingerprint
    from pneumonia_cnn.inference import Predictor, files
    used = []

    def counting(pool, function, items, chunk=32):
        used.append(function.__name__)
        return signals.map_with_signals_deferred(pool, function, items, chunk)

    for module in (files, cache, fingerprint):
        monkeypatch.setattr(module, "map_with_signals_deferred", counting)
    image = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(image)
    Predictor("builtin", "cpu").predict_files([image])
    fingerprint.file_fingerprints([image])
    list(cache._decode_in_pool([(str(image), (32, 32), "bilinear", "none")], 2))
    assert used == ["read", "file_fingerprint", "_decode_one"]
