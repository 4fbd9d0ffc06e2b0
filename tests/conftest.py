import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helper `reference`


MACHINE_TEMP_FOLDER = tempfile.gettempdir()   # before system_temp_folder: outside pytest's 0700 folders


@pytest.fixture(scope='session', autouse=True)
def system_temp_folder(tmp_path_factory):
    """The system temp folder of this run (and of its subprocesses, through TMPDIR), inside pytest's own: the mp4s
    the pipeline writes there without output_video are the caller's to delete, as the built-in's are; here they
    go with pytest's old runs instead of piling up in /tmp."""
    folder = str(tmp_path_factory.mktemp('system-temp'))
    before = tempfile.tempdir, os.environ.get('TMPDIR')
    tempfile.tempdir = os.environ['TMPDIR'] = folder
    yield folder
    tempfile.tempdir = before[0]
    if before[1] is None:
        del os.environ['TMPDIR']
    else:
        os.environ['TMPDIR'] = before[1]


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory):
    """A random tiny model dir with the ORIGINAL configuration.json layout."""
    from modelscope_t2v.tools.make_random_model import make_random_model
    return make_random_model(str(tmp_path_factory.mktemp('tiny-original')), 'tiny', 'original')


@pytest.fixture(scope='session')
def tiny_plugin_model_dir(tmp_path_factory):
    """A random tiny model dir whose configuration.json selects this plugin."""
    from modelscope_t2v.tools.make_random_model import make_random_model
    return make_random_model(str(tmp_path_factory.mktemp('tiny-plugin')), 'tiny', 'plugin')


@pytest.fixture(scope='session')
def tiny_engine(tiny_model_dir):
    """TextToVideo on the CPU in float32 over the tiny model dir."""
    from modelscope_t2v import TextToVideo
    return TextToVideo.from_pretrained(tiny_model_dir, device='cpu')


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a test module (pytestmark = pytest.mark.usefixtures('one_thread')): on busy shared
    cores OpenMP's spin-waits made whole files many times slower (test_controls.py: 13x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
