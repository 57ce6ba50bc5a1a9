"""Stopping on a signal, for train.py and eval_linear.py alike.

SIGTERM (a scheduler's preemption, SLURM's warning before the time limit), Ctrl-C (SIGINT) and
SIGHUP (the terminal or ssh session that started the run closed) ask the run to finish its
step, save and exit with 128 + the signal (143, 130, 129): a job script may requeue on those,
the run resumes from what it saved. A second signal stops at once, without saving: one
`error:` line says so and what is kept, and the status is 1, which claims no save. The same
signal again within REPEAT_S seconds is not a second one: SLURM signals every process of a job
step, torchrun among them, and torchrun passes the signal on to its ranks a moment later.
"""
import contextlib
import os
import signal
import sys
import threading
import time

from runtime.cli import EXIT_ERROR

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)",
                signal.SIGHUP: "SIGHUP (the terminal closed)"}
REPEAT_S = 5.0  # the same signal again this soon: the same request, delivered twice


@contextlib.contextmanager
def stop_on_signals(event: threading.Event, kept):
    """Within the block the first stop signal sets event (event.signum says which); a second
    prints one line ending with kept() (what is on disk) and exits 1 at once. The previous
    handlers come back after the block. Outside the main thread (tests) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, _frame):
        if event.is_set() and signum == event.signum and time.monotonic() - event.at < REPEAT_S:
            return  # the request that came before, passed on by torchrun or SLURM
        if event.is_set():
            print(f"error: a second {SIGNAL_NAMES[signum]}: stopped at once, without saving; {kept()}",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_ERROR)  # now, from wherever the step is: no cleanup that could wait
        event.signum, event.at = signum, time.monotonic()
        event.set()

    previous = {s: signal.signal(s, on_signal) for s in SIGNAL_NAMES}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Stopped(Exception):
    """Raised through an evaluation's calls once a signal stopped it and what it had is saved;
    status is the exit status `preempted` chose."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def preempted(env, where: str) -> int:
    """The line and exit status of a run stopped by a signal after saving what it had."""
    signum = getattr(env.stop, "signum", signal.SIGTERM)
    if env.main:
        print(f"{SIGNAL_NAMES[signum]}: stopped {where}; rerun the same command to resume "
              f"(exit status {128 + signum})", flush=True)
    return 128 + signum


def kept_checkpoint(folder: str) -> str:
    """What a run stopped now leaves to resume from."""
    path = os.path.join(folder, "checkpoint.pth")
    return f"the last checkpoint, {path}, is kept" if os.path.isfile(path) else \
        f"no checkpoint was written in {folder}"
