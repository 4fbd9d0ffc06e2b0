"""NaN or inf never becomes a black video reported as success: refused up front or raised, no file written."""

import os
import re

import pytest
import torch

from modelscope_t2v import NonFiniteError, parse_request

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py
SMALL = {'height': 16, 'width': 16, 'num_frames': 2, 'num_inference_steps': 3}


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_caller_latents_with_nan_or_inf_are_refused_up_front(tiny_engine, bad):
    latents = torch.randn(2, 4, 2, 2, 2)
    latents[1, 2, 0, 1, 1] = bad
    latents[0, 0, 1, 0, 0] = bad
    with pytest.raises(ValueError, match=r'latents hold 2 NaN or inf values of 64; starting noise must be finite'):
        parse_request({'text': 'a', 'latents': latents}, tiny_engine.config, num_videos_per_prompt=2, **SMALL)


def _nan_at_step(n):
    def callback(step, timestep, latents):
        if step == n:
            latents[0, 0, 0, 0, 0] = float('nan')   # in place: the sampler's next step reads it
    return callback


@pytest.mark.parametrize('sampler', ['ddim', 'dpm++2m'])
def test_non_finite_latents_raise_naming_step_and_sampler_and_write_no_file(tiny_engine, tmp_path, sampler):
    path = tmp_path / 'out.mp4'
    request = parse_request({'text': 'a', 'seed': 1}, tiny_engine.config, sampler=sampler, output_video=str(path),
                            callback=_nan_at_step(1), **SMALL)
    with pytest.raises(NonFiniteError, match=rf"NaN or inf at step 2 of 3 \(timestep \d+\) with "
                                             rf"sampler='{re.escape(sampler)}'.*no file was written"):
        tiny_engine(request)
    assert os.listdir(tmp_path) == []
    assert isinstance(NonFiniteError('x'), RuntimeError)


def test_the_last_step_is_checked_too(tiny_engine):
    request = parse_request({'text': 'a', 'seed': 1}, tiny_engine.config, output_type='latents',
                            callback=_nan_at_step(2), **SMALL)
    with pytest.raises(NonFiniteError, match=r'step 3 of 3 \(timestep 1\)'):
        tiny_engine(request)


def test_non_finite_decoded_frames_raise_and_write_no_file(tiny_engine, tmp_path, monkeypatch):
    decode = tiny_engine.decode
    monkeypatch.setattr(tiny_engine, 'decode', lambda latents, chunk: decode(latents, chunk) / 0.0)  # +-inf, NaN
    request = parse_request({'text': 'a', 'seed': 1}, tiny_engine.config, output_video=str(tmp_path / 'o.mp4'),
                            **SMALL)
    with pytest.raises(NonFiniteError, match='the autoencoder decoded NaN or inf'):
        tiny_engine(request)
    assert os.listdir(tmp_path) == []
