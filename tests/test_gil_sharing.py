"""gil_sharing: the GIL switch interval shortened while the package's threads run Python, then given back."""

import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from modelscope_t2v import TextToVideo, gil_sharing


@pytest.fixture
def process_interval():
    """The process's interval set to 7 ms for the test (Python's default is 5), and restored after it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.007)
    yield 0.007
    sys.setswitchinterval(before)


def test_shortened_while_any_holder_holds_then_restored(process_interval):
    first = gil_sharing.shorten()
    assert sys.getswitchinterval() == pytest.approx(gil_sharing.SWITCH_INTERVAL, abs=1e-5)
    second = gil_sharing.shorten()
    first()
    first()   # a second call does not release the other holder
    assert sys.getswitchinterval() == pytest.approx(gil_sharing.SWITCH_INTERVAL, abs=1e-5)
    second()
    assert sys.getswitchinterval() == pytest.approx(process_interval, abs=1e-5)


def test_a_shorter_interval_of_the_process_is_kept(monkeypatch, process_interval):
    sys.setswitchinterval(0.0002)
    with gil_sharing.shortened():
        assert sys.getswitchinterval() == pytest.approx(0.0002, abs=1e-5)
    assert sys.getswitchinterval() == pytest.approx(0.0002, abs=1e-5)


def test_shortened_until_the_last_job_is_done_or_cancelled(process_interval):
    jobs = [Future() for _ in range(3)]
    gil_sharing.shorten_until_done(jobs)
    jobs[0].set_result(1)
    jobs[1].cancel()
    assert sys.getswitchinterval() == pytest.approx(gil_sharing.SWITCH_INTERVAL, abs=1e-5)
    jobs[2].set_exception(OSError('unreadable'))
    assert sys.getswitchinterval() == pytest.approx(process_interval, abs=1e-5)
    gil_sharing.shorten_until_done([])   # nothing to wait for: nothing shortened
    assert sys.getswitchinterval() == pytest.approx(process_interval, abs=1e-5)


def test_jobs_finishing_on_other_threads_restore_the_interval(process_interval):
    with ThreadPoolExecutor(4) as pool:
        gil_sharing.shorten_until_done([pool.submit(sum, range(10 ** 5)) for _ in range(40)])
    assert sys.getswitchinterval() == pytest.approx(process_interval, abs=1e-5)


def test_loading_an_engine_gives_the_interval_back(tiny_model_dir, monkeypatch, process_interval):
    seen, shorten = [], gil_sharing.shorten

    def watched():
        release = shorten()
        seen.append(sys.getswitchinterval())
        return release
    monkeypatch.setattr(gil_sharing, 'shorten', watched)
    TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    assert seen == [pytest.approx(gil_sharing.SWITCH_INTERVAL, abs=1e-5)]
    assert sys.getswitchinterval() == pytest.approx(process_interval, abs=1e-5)
