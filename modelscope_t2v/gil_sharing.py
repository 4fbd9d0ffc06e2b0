"""A shorter GIL switch interval while the package's own threads run Python beside the main thread.

CPython passes the GIL from a thread running Python to one waiting for it only every sys.getswitchinterval()
seconds (5 ms by default). Every torch call gives the GIL up and takes it back, so while another thread runs
Python each torch call of the main thread waits up to that long: on the project's CPU a small torch op took
about 3 ms beside a thread running Python, against 3 µs alone, and 0.35 ms at a 1 ms interval. A warm start has
such threads: the compile cache's loader (inductor's loading is Python) and diffusers' import, while the main
thread makes a torch call for every tensor it loads and moves.

shorten() sets the interval to SWITCH_INTERVAL (unless it is shorter already) until every caller has released
it; then the interval the process had is set again.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import Future
from typing import Callable, Iterable, Iterator

SWITCH_INTERVAL = 0.001   # seconds

_lock = threading.Lock()
_holders = 0
_restore_to = 0.0   # the process's interval before the first holder


def shorten() -> Callable[[], None]:
    """Shorten the switch interval until the returned function is called (more calls do nothing)."""
    global _holders, _restore_to
    with _lock:
        if _holders == 0:
            _restore_to = sys.getswitchinterval()
            sys.setswitchinterval(min(SWITCH_INTERVAL, _restore_to))
        _holders += 1
    released = threading.Event()

    def release() -> None:
        global _holders
        with _lock:
            if released.is_set():
                return
            released.set()
            _holders -= 1
            if _holders == 0:
                sys.setswitchinterval(_restore_to)
    return release


@contextlib.contextmanager
def shortened() -> Iterator[None]:
    """The switch interval shortened inside the block."""
    release = shorten()
    try:
        yield
    finally:
        release()


def shorten_until_done(jobs: Iterable[Future]) -> None:
    """Shorten the switch interval until every one of `jobs` is done (or cancelled)."""
    jobs = list(jobs)
    if not jobs:
        return
    release, left, lock = shorten(), [len(jobs)], threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            release()
    for job in jobs:
        job.add_done_callback(one_done)
