"""Every way a model folder can be broken, through the command line: a user error (exit status 2) that names
the file, and the key where there is one, raised before any generation; never a raw RuntimeError,
ZeroDivisionError, IndexError or AttributeError (exit status 1)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from modelscope_t2v import TextToVideo, cli
from modelscope_t2v.config import TINY, replace
from modelscope_t2v.convert import convert
from modelscope_t2v.tools.make_random_model import write_model_dir
from modelscope_t2v.weights import CheckpointError

SMALL = ['--num-frames', '2', '--height', '64', '--width', '64', '--steps', '1', '--device', 'cpu', '--seed', '1']
UNET, VAE, CLIP = 'text2video_pytorch_model.pth', 'VQGAN_autoencoder.pth', 'open_clip_pytorch_model.bin'
pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def edit_json(name, change):
    """A break: the JSON file `name` of the folder, changed in place by change(dict)."""
    def apply(folder):
        path = os.path.join(folder, name)
        with open(path) as f:
            raw = json.load(f)
        change(raw)
        replace_file(path, json.dumps(raw))
    return apply


def model_cfg(key, value):
    return edit_json('configuration.json', lambda raw: raw['model']['model_cfg'].__setitem__(key, value))


def model_args(key, value):
    return edit_json('configuration.json', lambda raw: raw['model']['model_args'].__setitem__(key, value))


def write_text(name, text):
    return lambda folder: replace_file(os.path.join(folder, name), text)


def replace_file(path, text):
    os.remove(path)   # a link to the shared file: replaced, not written through
    with open(path, 'w') as f:
        f.write(text)


def int32_unet(folder):
    state = torch.load(os.path.join(folder, UNET), weights_only=True)
    os.remove(os.path.join(folder, UNET))
    torch.save({k: v.to(torch.int32) for k, v in state.items()}, os.path.join(folder, UNET))


def truncated(name):
    def apply(folder):
        data = open(os.path.join(folder, name), 'rb').read()
        os.remove(os.path.join(folder, name))
        open(os.path.join(folder, name), 'wb').write(data[:len(data) // 2])
    return apply


# (id, layout, break, error class, file named in the message, text the message holds)
CASES = [
    ('invalid JSON', 'original', write_text('configuration.json', '{"model": '), ValueError, 'configuration.json',
     'is not valid JSON'),
    ('a JSON list', 'original', write_text('configuration.json', '[{"model": {}}]'), ValueError,
     'configuration.json', 'must hold a JSON object'),
    ('unet_dim 0', 'original', model_cfg('unet_dim', 0), ValueError, 'configuration.json',
     'unet_dim=0 must be at least 32'),
    ('unet_dim negative', 'original', model_cfg('unet_dim', -32), ValueError, 'configuration.json', 'unet_dim=-32'),
    ('unet_dim a string', 'original', model_cfg('unet_dim', '32'), TypeError, 'configuration.json',
     "unet_dim='32' must be an integer"),
    ('unet_dim a float', 'original', model_cfg('unet_dim', 32.0), TypeError, 'configuration.json',
     'unet_dim=32.0 must be an integer'),
    ('unet_dim not of 32 groups', 'original', model_cfg('unet_dim', 48), ValueError, 'configuration.json',
     'unet_dim=48 must be a multiple of 32'),
    ('unet_dim_mult empty', 'original', model_cfg('unet_dim_mult', []), ValueError, 'configuration.json',
     'unet_dim_mult=[] must be a non-empty list'),
    ('text_heads 0', 'original', model_cfg('text_heads', 0), ValueError, 'configuration.json', 'text_heads=0'),
    ('vae_scale_factor a string', 'original', model_cfg('vae_scale_factor', 'x'), TypeError, 'configuration.json',
     "vae_scale_factor='x' must be a finite number > 0"),
    ('beta_start 0', 'original', model_cfg('beta_start', 0), ValueError, 'configuration.json',
     'beta_start=0 must be a number in (0, 1)'),
    ('num_timesteps 0', 'original', model_cfg('num_timesteps', 0), ValueError, 'configuration.json',
     'num_timesteps=0 must be at least 1'),
    ('temporal_attention yes', 'original', model_cfg('temporal_attention', 'yes'), ValueError, 'configuration.json',
     "temporal_attention='yes' is not a boolean"),
    ('unknown key', 'original', model_cfg('unet_dimm', 32), ValueError, 'configuration.json', "['unet_dimm']"),
    ('text width not the context', 'original', model_cfg('unet_context_dim', 128), ValueError,
     'configuration.json', "context_dim=128 must equal the text encoder's width=64"),
    ('max_frames 0', 'original', model_args('max_frames', 0), ValueError, 'configuration.json',
     'model_args.max_frames=0 must be at least 1'),
    ('ckpt_unet outside', 'original', model_args('ckpt_unet', f'../tiny/{UNET}'), ValueError, 'configuration.json',
     'model_args.ckpt_unet=\'../tiny/text2video_pytorch_model.pth\' must name a file inside the model folder'),
    ('ckpt_clip absolute', 'original', model_args('ckpt_clip', '/etc/hostname'), ValueError, 'configuration.json',
     "model_args.ckpt_clip='/etc/hostname' must name a file inside"),
    ('int32 checkpoint', 'original', int32_unet, CheckpointError, UNET,
     'tensors that are not floating point, e.g. ['),
    ('truncated checkpoint', 'original', truncated(VAE), CheckpointError, VAE, 'could not be read'),
    ('missing checkpoint', 'original', lambda folder: os.remove(os.path.join(folder, CLIP)), CheckpointError, CLIP,
     'not found there'),
    ('diffusers block_out_channels empty', 'diffusers',
     edit_json('unet/config.json', lambda raw: raw.__setitem__('block_out_channels', [])), ValueError,
     os.path.join('unet', 'config.json'), 'block_out_channels=[]'),
    ('diffusers block_out_channels 0', 'diffusers',
     edit_json('unet/config.json', lambda raw: raw.__setitem__('block_out_channels', [0, 0])), ValueError,
     os.path.join('unet', 'config.json'), 'ZeroDivisionError: integer modulo by zero'),
    ('diffusers vae invalid JSON', 'diffusers', write_text('vae/config.json', '{'), CheckpointError,
     os.path.join('vae', 'config.json'), 'is not valid JSON'),
    ('diffusers num_train_timesteps 0', 'diffusers',
     edit_json('scheduler/scheduler_config.json', lambda raw: raw.__setitem__('num_train_timesteps', 0)),
     ValueError, 'scheduler_config.json', 'num_timesteps=0 must be at least 1'),
    ('diffusers hidden_size a string', 'diffusers',
     edit_json('text_encoder/config.json', lambda raw: raw.__setitem__('hidden_size', 'wide')), TypeError,
     os.path.join('text_encoder', 'config.json'), 'unsupported operand'),
]


@pytest.fixture(scope='module')
def tiny_diffusers_dir(tmp_path_factory):
    """A tiny random model in diffusers' layout (whose first temporal transformer has 8 heads, always)."""
    original = str(tmp_path_factory.mktemp('tiny-8-heads') / 'model')
    write_model_dir(original, replace(TINY, unet=replace(TINY.unet, num_heads=8)))
    return convert(original, str(tmp_path_factory.mktemp('diffusers') / 'tiny'), 'diffusers')


def broken_copy(source, tmp_path, damage) -> str:
    """A copy of the model folder `source` (its weight files linked, its JSON files copied), then damaged."""
    folder = str(tmp_path / 'model')
    shutil.copytree(source, folder, copy_function=lambda src, dst: (
        shutil.copy(src, dst) if src.endswith('.json') else os.symlink(os.path.abspath(src), dst)))
    damage(folder)
    return folder


@pytest.mark.parametrize('layout, damage, error, file, text', [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_a_broken_model_folder_is_a_user_error_naming_the_file(layout, damage, error, file, text, request,
                                                              tmp_path, capsys):
    source = request.getfixturevalue('tiny_model_dir' if layout == 'original' else 'tiny_diffusers_dir')
    folder = broken_copy(source, tmp_path, damage)
    with pytest.raises(error) as info:
        TextToVideo.from_pretrained(folder, device='cpu')
    assert file in str(info.value) and text in str(info.value), str(info.value)
    out = tmp_path / 'never.mp4'
    assert cli.main(['a red kite', '--model', folder, '-o', str(out)] + SMALL) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('modelscope-t2v: error:'), lines
    assert file in lines[0] and text in lines[0], lines[0]
    assert not out.exists()


def test_invalid_json_in_a_fresh_process_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    """ModelScope's own reader of configuration.json left a temporary file's traceback on stderr."""
    folder = broken_copy(tiny_model_dir, tmp_path, write_text('configuration.json', '{"model": '))
    done = subprocess.run([sys.executable, '-m', 'modelscope_t2v', 'a red kite', '--model', folder] + SMALL,
                          capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f'modelscope-t2v: error: {folder}/configuration.json is not valid JSON: Expecting value: line 1 column 11 '
        '(char 10)']
