"""Training releases the GIL, and Ctrl-C stops it cleanly."""

import _thread
import signal
import threading
import time

import pytest

import nca
from conftest import small_config


def test_other_threads_run_during_training():
    times = {}

    def work():
        times["start"] = time.perf_counter()
        times["run"] = nca.train(small_config(steps=1500), progress=False)
        times["end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    start, end = times["start"], times["end"]
    assert end - start > 0.2, "training too short to tell"
    # Ticks in the middle half of the training: none if it held the GIL throughout.
    lo, hi = start + (end - start) / 4, end - (end - start) / 4
    middle = [t for t in ticks if lo <= t <= hi]
    assert len(middle) > 1000, (len(middle), end - start)
    assert times["run"].status == "completed"


@pytest.fixture
def ctrl_c_handled():
    """Python's own Ctrl-C handler, as in a terminal or a notebook. A process started in
    the background by a non-interactive shell inherits SIGINT ignored, and then
    `interrupt_main` does nothing at all (the run would go on for its million steps)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_training_and_returns_the_run(ctrl_c_handled):
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.warns(UserWarning, match="interrupted"):
            run = nca.train(small_config(steps=1_000_000), progress=False)
    finally:
        timer.cancel()
    assert run.status == "interrupted"
    assert 0 < run.summary["final_step"] < 1_000_000
    assert run.losses.shape == (run.summary["final_step"],)
    assert run.summary["regrowth"] is not None


def test_ctrl_c_with_on_step_too(ctrl_c_handled):
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    steps = []
    try:
        with pytest.warns(UserWarning, match="interrupted"):
            run = nca.train(
                small_config(steps=1_000_000), on_step=lambda s, l: steps.append(s), progress=False
            )
    finally:
        timer.cancel()
    assert run.status == "interrupted"
    # Ctrl-C lands after a step: on_step saw it, or the stop came just before the call.
    assert run.summary["final_step"] - 1 <= steps[-1] <= run.summary["final_step"]
