"""The ModelScope route: registration, both configuration layouts, files that play everywhere."""

import importlib
import json
from importlib.metadata import distribution

import numpy as np
import pytest
import torch

import modelscope_t2v  # noqa: F401  (registers the plugin)
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope_t2v.pipeline import TextToVideoPipeline
from modelscope_t2v.video_io import probe_video, read_frames

PROMPT = 'A panda eating bamboo on a rock.'
SMALL = dict(num_frames=4, height=64, width=64, num_inference_steps=2)


@pytest.fixture(scope='module')
def original_pipe(tiny_model_dir):
    return pipeline('text-to-video-synthesis', tiny_model_dir, device='cpu')


def test_original_configuration_runs_through_the_plugin(original_pipe, tiny_model_dir):
    with open(f'{tiny_model_dir}/configuration.json') as f:
        assert json.load(f)['model']['type'] == 'latent-text-to-video-synthesis'
    assert isinstance(original_pipe, TextToVideoPipeline)
    engine = original_pipe.model.engine
    assert (engine.device.type, engine.dtype) == ('cpu', torch.float32)


@pytest.mark.slow
def test_default_generation_writes_a_browser_playable_mp4(original_pipe):
    """The model card's call, unchanged: 16 frames of 256x256 at 8 fps, DDIM 50, guidance 9."""
    out = original_pipe({'text': PROMPT})
    info = probe_video(out[OutputKeys.OUTPUT_VIDEO])
    assert {k: info[k] for k in ('codec', 'pix_fmt', 'frames', 'fps', 'width', 'height')} == dict(
        codec='h264', pix_fmt='yuv420p', frames=16, fps=8.0, width=256, height=256)
    params = out['parameters']
    assert (params['num_inference_steps'], params['guidance_scale'], params['sampler']) == (50, 9.0, 'ddim')


def test_output_video_path_and_same_seed_same_frames(original_pipe, tmp_path):
    first = original_pipe({'text': PROMPT, 'seed': 11}, output_video=str(tmp_path / 'a.mp4'), **SMALL)
    original_pipe({'text': PROMPT, 'seed': 11}, output_video=str(tmp_path / 'b.mp4'), **SMALL)
    assert first[OutputKeys.OUTPUT_VIDEO] == str(tmp_path / 'a.mp4')
    assert np.array_equal(read_frames(tmp_path / 'a.mp4'), read_frames(tmp_path / 'b.mp4'))
    frames = original_pipe({'text': PROMPT, 'seed': 11}, output_type='frames', **SMALL)['frames']
    assert frames.dtype == np.uint8 and frames.shape == (4, 64, 64, 3)


def test_height_and_width_are_independent(original_pipe):
    """The original ignores width unless height is given; here each is honoured."""
    frames = original_pipe({'text': PROMPT, 'seed': 1, 'width': 128}, output_type='frames',
                           num_frames=2, num_inference_steps=1)['frames']
    assert frames.shape == (2, 256, 128, 3)


def test_plugin_configuration_needs_and_honours_trust_remote_code(tiny_plugin_model_dir, monkeypatch):
    # ModelScope finds a plugin's modules by building its wheel from PyPI; offline, read them
    # from the installed distribution instead (what that wheel would list).
    plugins = importlib.import_module('modelscope.utils.plugins')

    def installed_modules(package):
        dist = distribution(package)
        return dist.read_text('top_level.txt').split(), dist.version, dist.metadata['Name']

    monkeypatch.setattr(plugins, 'get_modules_from_package', installed_modules)
    with pytest.raises(RuntimeError, match='trust_remote_code'):
        pipeline('text-to-video-synthesis', tiny_plugin_model_dir, device='cpu')
    pipe = pipeline('text-to-video-synthesis', tiny_plugin_model_dir, device='cpu', trust_remote_code=True)
    assert isinstance(pipe, TextToVideoPipeline)
    out = pipe({'text': PROMPT, 'seed': 2}, **SMALL)
    info = probe_video(out[OutputKeys.OUTPUT_VIDEO])
    assert (info['codec'], info['frames'], info['width']) == ('h264', 4, 64)


def test_repo_configuration_selects_the_plugin():
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, 'configuration.json')) as f:
        cfg = json.load(f)
    assert cfg['model']['type'] == cfg['pipeline']['type'] == 'modelscope-t2v'
    assert cfg['plugins'] == ['modelscope-t2v']
    assert cfg['task'] == 'text-to-video-synthesis'


def test_a_call_with_a_lora_changes_only_that_call(original_pipe, tmp_path):
    """pipeline()'s lora= / lora_scale= (parse_request's checks apply as for every option)."""
    from modelscope_t2v.config import TINY
    from modelscope_t2v.tools.make_random_lora import make_random_loras
    lora = make_random_loras(str(tmp_path), TINY, formats=('stable',))['stable']
    call = dict(SMALL, seed=3, output_type='latents')
    base = original_pipe({'text': PROMPT}, **call)['latents']
    out = original_pipe({'text': PROMPT, 'lora': lora}, lora_scale=0.5, **call)
    assert out['parameters']['lora'] == [lora] and out['parameters']['lora_scale'] == [0.5]
    assert (out['latents'] - base).abs().max() > 1e-3
    assert torch.equal(original_pipe({'text': PROMPT}, **call)['latents'], base)
    with pytest.raises(ValueError, match='lora_scale=20.0 is outside the valid range'):
        original_pipe({'text': PROMPT, 'lora': lora}, lora_scale=20, **call)


def test_compile_options_reach_the_engine(tiny_model_dir, monkeypatch, tmp_path):
    """pipeline()'s compile_unet, compile_cache and cuda_graphs reach TextToVideo.from_pretrained."""
    from modelscope_t2v import text_to_video
    seen = []
    monkeypatch.setattr(text_to_video, 'check_compile_options', lambda *options: seen.append(options))
    pipeline('text-to-video-synthesis', tiny_model_dir, device='cpu', compile_unet='default',
             compile_cache=str(tmp_path))
    pipeline('text-to-video-synthesis', tiny_model_dir, device='cpu', cuda_graphs=True)
    assert seen == [('default', str(tmp_path), False)] * 2 + [(False, False, True)] * 2   # from_pretrained, from_networks
