"""Python processes that build compile-cache artefacts (artefact_builds.build_from_skeleton), several at once.

Each worker is a Python process running serve(), started once and fed one pickled job after another on its
standard input; it answers on a copy of its standard output (None, or the error's text), and what it prints goes to
standard error. Not multiprocessing: a spawned process would first run the caller's main script again, which in
scripts without an `if __name__ == '__main__':` guard (ModelScope's examples) generates a video in each worker.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor


class WorkerPool:
    """`size` worker processes, started together on the first job; submit(job) runs
    artefact_builds.build_from_skeleton(*job) in an idle one."""

    def __init__(self, size: int):
        self.size = size
        self.idle: queue.Queue = queue.Queue()
        self.threads = None   # one a worker: each waits on its job's answer

    def submit(self, job: tuple) -> Future:
        if self.threads is None:
            for _ in range(self.size):
                self.idle.put(start_worker())
            self.threads = ThreadPoolExecutor(self.size)
        return self.threads.submit(self.run, job)

    def run(self, job: tuple) -> None:
        worker = self.idle.get()
        try:
            pickle.dump(job, worker.stdin)
            worker.stdin.flush()
            error = pickle.load(worker.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            worker.kill()
            worker = start_worker()
            raise RuntimeError(f'a compile-cache build worker ended while building {job[3]} (see its output above)')
        finally:
            self.idle.put(worker)
        if error is not None:
            raise RuntimeError(f'building {job[3]} failed: {error}')

    def shutdown(self) -> None:
        """End the workers, all at once (each at the end of its input), and return: a thread waits for them. A
        worker takes seconds to exit; waiting for 8 in turn was 17 s of a cold start-up on an H100."""
        if self.threads is None:
            return
        self.threads.shutdown()
        self.threads = None
        workers = []
        while not self.idle.empty():
            workers.append(self.idle.get())
            workers[-1].stdin.close()
        threading.Thread(target=lambda: [worker.wait() for worker in workers], daemon=True).start()


def start_worker() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', f'from {__name__} import serve; serve()'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def serve() -> None:
    """A worker's loop: jobs from standard input until it closes, each answered on the original standard output."""
    from .artefact_builds import build_from_skeleton
    answers = os.fdopen(os.dup(sys.stdout.fileno()), 'wb')
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # what the build prints cannot garble the answers
    jobs = sys.stdin.buffer
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return
        try:
            build_from_skeleton(*job)
            answer = None
        except Exception as error:   # the caller raises it, naming the artefact
            answer = f'{type(error).__name__}: {error}'
        pickle.dump(answer, answers)
        answers.flush()
