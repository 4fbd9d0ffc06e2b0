"""The Gradio demo as a user meets it: demo/app.py served on localhost, driven in headless Chromium.

Needs Debian's chromium (`.ci/install-browser.sh`) and the test and demo extras (Playwright, Gradio).
Missing, they fail these tests (they are not skipped).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / 'demo' / 'app.py'
CHROMIUM = '/usr/bin/chromium'
# Headless as root on a machine without network; no background connections.
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']
INSTALL_HINT = 'run .ci/install-browser.sh (Debian chromium) and pip install -e ".[test,demo]" (playwright, gradio)'
START_TIMEOUT_S = 180     # importing modelscope and gradio takes ~25 s on a 2-core CPU
GENERATE_TIMEOUT_S = 240  # 16 frames of 256x256, 2 steps on the tiny model: 10-40 s on a 2-core CPU


@pytest.fixture(scope='module')
def demo_folders(tmp_path_factory):
    """The demo's temp folder ($TMPDIR) and Gradio's cache ($GRADIO_TEMP_DIR, else inside the temp folder)."""
    return tmp_path_factory.mktemp('demo-tmp'), tmp_path_factory.mktemp('gradio-cache')


@pytest.fixture(scope='module')
def demo_url(tiny_model_dir, tmp_path_factory, demo_folders):
    """demo/app.py on 127.0.0.1 at a free port, its model dir given as a Studio deployment would."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail(f'gradio is not installed: {INSTALL_HINT}')
    port = _free_port()
    log_path = tmp_path_factory.mktemp('demo') / 'app.log'
    env = {**os.environ, 'MODELSCOPE_T2V_MODEL': tiny_model_dir, 'GRADIO_ANALYTICS_ENABLED': 'False',
           'HF_HUB_OFFLINE': '1', 'TMPDIR': str(demo_folders[0]), 'GRADIO_TEMP_DIR': str(demo_folders[1])}
    with open(log_path, 'w') as log:
        process = subprocess.Popen([sys.executable, str(APP), '--device', 'cpu', '--host', '127.0.0.1',
                                    '--port', str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    try:
        _wait_until_serving(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope='module')
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f'playwright for Python is not installed: {INSTALL_HINT}')
    if not os.path.exists(CHROMIUM):
        pytest.fail(f'{CHROMIUM} not found (Debian package chromium): {INSTALL_HINT}')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_url):
    context = browser.new_context(viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    page.goto(demo_url)
    page.locator('#generate').wait_for()
    yield page
    context.close()


def test_prompt_to_a_video_that_plays_in_the_page(page, tmp_path, capsys):
    page.locator('#seed').get_by_role('button', name='Random seed').click()
    page.wait_for_function("() => document.querySelector('#seed input').value !== ''")
    assert 0 <= int(page.locator('#seed input').input_value()) < 2 ** 31

    page.locator('#prompt textarea').fill('A panda eating bamboo on a rock.')
    page.locator('#seed input').fill('1234')
    page.locator('#steps input[type=number]').fill('2')
    page.locator('#steps input[type=number]').press('Tab')
    page.locator('#frames input[type=number]').fill('16')
    page.locator('#frames input[type=number]').press('Tab')
    started = time.monotonic()
    page.locator('#generate').click()

    # the <video> has loaded its first frames: readyState 2 is HAVE_CURRENT_DATA
    page.wait_for_function("() => { const v = document.querySelector('#video video');"
                           "        return v !== null && v.readyState >= 2; }",
                           timeout=GENERATE_TIMEOUT_S * 1000)
    seconds = time.monotonic() - started
    video = page.evaluate("() => { const v = document.querySelector('#video video');"
                          "        return {readyState: v.readyState, duration: v.duration, width: v.videoWidth,"
                          "                height: v.videoHeight, error: v.error && v.error.code}; }")
    assert video['readyState'] >= 2 and video['error'] is None, video
    assert 1.9 <= video['duration'] <= 2.1, video  # 16 frames at 8 fps
    assert (video['width'], video['height']) == (256, 256), video

    page.get_by_text('"num_inference_steps"').wait_for()
    shown = ''.join(page.locator('#parameters').inner_text().split())
    for key, value in (('seed', 1234), ('num_inference_steps', 2), ('num_frames', 16), ('fps', 8)):
        assert f'"{key}":{value},' in shown, shown

    screenshot = _screenshot(page, tmp_path / 'demo-video.png')
    with capsys.disabled():
        print(f'\ndemo screenshot: {screenshot} (video after {seconds:.0f} s)')


def test_invalid_input_shows_a_readable_error(page, tmp_path, capsys):
    page.locator('#prompt textarea').fill('')
    page.locator('#generate').click()
    message = page.get_by_text("text='' is empty; describe the video in English")
    message.first.wait_for(timeout=60_000)
    assert message.first.is_visible()
    assert page.locator('#video video').count() == 0
    page.wait_for_timeout(1000)  # the message fades in; let the screenshot show it whole
    screenshot = _screenshot(page, tmp_path / 'demo-error.png')
    with capsys.disabled():
        print(f'\ndemo error screenshot: {screenshot}')


def test_requests_leave_no_file_in_the_temp_folder(page, demo_folders):
    """The pipeline's mp4 in the temp folder is the demo's to delete, once Gradio has copied it into its cache:
    after each of 3 requests the demo's temp folder is empty, and the cache holds one copy per video."""
    temp, cache = demo_folders
    served_before = _files(cache)
    page.locator('#steps input[type=number]').fill('1')
    page.locator('#steps input[type=number]').press('Tab')
    page.locator('#frames input[type=number]').fill('2')
    page.locator('#frames input[type=number]').press('Tab')
    page.locator('#prompt textarea').fill('A red kite over the sea.')
    for seed in (101, 102, 103):
        page.locator('#seed input').fill(str(seed))
        page.locator('#generate').click()
        page.get_by_text(f'"seed": {seed}').wait_for(timeout=GENERATE_TIMEOUT_S * 1000)
        deadline = time.monotonic() + 30   # the generator resumes, and removes the file, after the video is sent
        while _files(temp) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _files(temp) == [], seed
    served = [path for path in _files(cache) if path not in served_before and path.endswith('.mp4')]
    assert len(served) == 3 and all(os.path.basename(path).startswith('modelscope_t2v-') for path in served)


def _files(folder: Path) -> list:
    """Every file under folder, as paths relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob('*') if path.is_file())


def _screenshot(page, path: Path) -> Path:
    """A full-page PNG; copied into $TEST_ARTIFACTS_DIR too when that is set (for CI to keep)."""
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get('TEST_ARTIFACTS_DIR'):
        os.makedirs(os.environ['TEST_ARTIFACTS_DIR'], exist_ok=True)
        shutil.copy(path, os.environ['TEST_ARTIFACTS_DIR'])
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f'demo/app.py exited with {process.returncode}:\n{_tail(log_path)}')
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f'demo/app.py did not serve {url} within {START_TIMEOUT_S} s:\n{_tail(log_path)}')


def _tail(path: Path, lines: int = 30) -> str:
    return '\n'.join(path.read_text().splitlines()[-lines:])


def test_a_starting_video_is_re_rendered(page, tmp_path):
    """The optional upload: a 4-frame clip re-rendered at strength 0.5 (video-to-video)."""
    import numpy as np

    from modelscope_t2v.video_io import write_video
    clip = write_video(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
                       tmp_path / 'start.mp4')
    page.locator('#prompt textarea').fill('A panda eating bamboo on a rock.')
    page.locator('#steps input[type=number]').fill('2')
    page.locator('#steps input[type=number]').press('Tab')
    page.locator('#frames input[type=number]').fill('4')
    page.locator('#frames input[type=number]').press('Tab')
    page.get_by_text('Start from a video or an image').click()
    page.locator('#init-video input[type=file]').set_input_files(clip)
    page.locator('#init-video video').wait_for(timeout=60_000)   # the upload is shown
    page.locator('#strength input[type=number]').fill('0.5')
    page.locator('#strength input[type=number]').press('Tab')
    page.locator('#generate').click()
    page.get_by_text('"strength"').wait_for(timeout=GENERATE_TIMEOUT_S * 1000)
    shown = ''.join(page.locator('#parameters').inner_text().split())
    assert '"start":"video"' in shown and '"strength":0.5' in shown and '"num_frames":4' in shown, shown


def _load_app():
    import importlib.util
    spec = importlib.util.spec_from_file_location('demo_app', APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def test_generations_run_on_one_thread_with_the_callers_context():
    """Gradio calls handlers from a pool of threads; torch keeps compiled CUDA graphs per thread."""
    import contextvars
    import threading
    app = _load_app()
    thread, event = app.GenerationThread(), contextvars.ContextVar('event')
    seen = []

    def handler(name):   # as Gradio calls a handler: its own thread, its event in the context
        event.set(name)
        thread.run(lambda: seen.append((threading.get_ident(), event.get(None))))

    callers = [threading.Thread(target=handler, args=(f'event {i}',)) for i in range(3)]
    for caller in callers:
        caller.start()
        caller.join()
    assert len({ident for ident, _ in seen}) == 1 and seen[0][0] not in {c.ident for c in callers}
    assert [name for _, name in seen] == ['event 0', 'event 1', 'event 2']


def test_warm_up_makes_a_default_video_on_the_generation_thread_then_stops_compiling(capsys):
    import threading
    from types import SimpleNamespace
    app = _load_app()
    thread, calls = app.GenerationThread(), []
    generation_thread = thread.run(threading.get_ident)

    class Pipe:
        model = SimpleNamespace(engine=SimpleNamespace(stop_compiling=lambda: calls.append('stop compiling')))

        def __call__(self, inputs, **options):
            calls.append((threading.get_ident(), inputs, options))

    app.warm_up(Pipe(), thread)
    assert calls == [(generation_thread, {'text': app.EXAMPLES[0]}, {'output_type': 'frames'}), 'stop compiling']
    assert 'compiling the networks' in capsys.readouterr().err


@pytest.mark.parametrize('flags, compiles, cache, graphs', [
    ([], False, False, True), (['--no-cuda-graphs'], False, False, False), (['--compile'], True, False, False),
    (['--compile-cache'], True, True, False), (['--cuda-graphs'], False, False, True)])
def test_compile_flags(flags, compiles, cache, graphs):
    args = _load_app().parse_args(flags)
    assert (args.compile, args.compile_cache, args.cuda_graphs) == (compiles, cache, graphs)


def test_cuda_graphs_with_compiling_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_app().parse_args(['--compile', '--cuda-graphs'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith('error: --cuda-graphs replays the uncompiled networks: it cannot go '
                                            'with --compile or --compile-cache\n')


@pytest.mark.parametrize('flags, graphs, said', [
    ([], True, 'demo: replaying the networks from CUDA graphs, captured on the first request of each shape\n'),
    (['--no-cuda-graphs'], False, '')])
def test_main_loads_with_cuda_graphs_unless_told_not_and_says_so(monkeypatch, capsys, flags, graphs, said):
    from types import SimpleNamespace
    import torch
    app = _load_app()
    loaded = []
    pipe = SimpleNamespace(model=SimpleNamespace(engine=SimpleNamespace(device=torch.device('cuda'))))
    monkeypatch.setattr(app, 'load_pipeline', lambda *args: loaded.append(args) or pipe)
    monkeypatch.setattr(app, 'build_demo', lambda *args: SimpleNamespace(launch=lambda **where: None))
    app.main(flags)
    assert loaded[0][-3:] == (False, False, graphs)   # compile, compile_cache, cuda_graphs
    assert capsys.readouterr().err == said
