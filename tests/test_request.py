"""parse_request: every bad value is refused with a message that names the key, the
value and the valid range or choices, before any model work (no model is built here)."""

import math
import re

import pytest
import torch

from modelscope_t2v.config import TINY, replace
from modelscope_t2v.request import INPUT_KEYS, parse_request
from modelscope_t2v.schedulers import SAMPLERS

PROMPT = {'text': 'a panda eating bamboo'}


# (options, exception, regex the message must match); '{tmp}' in a path is a fresh temp folder
BAD = [
    ({'text': ''}, ValueError, r"text='' is empty"),
    ({'text': '   '}, ValueError, r"text='   ' is empty"),
    ({'text': 5}, TypeError, r'text must be a string or a non-empty list of strings, not 5'),
    ({'text': ['a', 3]}, TypeError, r"text must hold strings; got 3 \(int\)"),
    ({'text': []}, TypeError, r'text must be a string or a non-empty list of strings, not \[\]'),
    ({'height': 250}, ValueError, r'height=250 is not a multiple of 8 .* e\.g\. 248 or 256'),
    ({'height': 0}, ValueError, r'height=0 is outside the valid range 8\.\.4096'),
    ({'width': 5000}, ValueError, r'width=5000 is outside the valid range 8\.\.4096'),
    ({'num_inference_steps': -3}, ValueError, r'num_inference_steps=-3 is outside the valid range 1\.\.1000'),
    ({'num_inference_steps': 0}, ValueError, r'num_inference_steps=0 is outside the valid range 1\.\.1000'),
    ({'num_inference_steps': 2.5}, TypeError, r'num_inference_steps must be an integer in 1\.\.1000, not 2\.5'),
    ({'guidance_scale': math.nan}, ValueError, r'guidance_scale=nan is outside the valid range \[0\.0, 100\.0\]'),
    ({'guidance_scale': 'x'}, TypeError, r"guidance_scale must be a number in \[0\.0, 100\.0\], not 'x'"),
    ({'guidance_scale': -1}, ValueError, r'guidance_scale=-1\.0 is outside the valid range \[0\.0, 100\.0\]'),
    ({'fps': 0}, ValueError, r'fps=0\.0 is outside the valid range \[0\.01, 240\.0\]'),
    ({'fps': 1e-300}, ValueError, r'fps=1e-300 is outside the valid range \[0\.01, 240\.0\]'),
    ({'eta': 2}, ValueError, r'eta=2\.0 is outside the valid range \[0\.0, 1\.0\]'),
    ({'sampler': 'dpm'}, ValueError,
     r"sampler='dpm' is unknown; choose one of \['ddim', 'dpm\+\+2m', .*'unipc'\]"),
    ({'sampler': 3}, TypeError, r'sampler must be a name or a diffusers scheduler, not int'),
    ({'num_frames': 0}, ValueError, r'num_frames=0 is outside the valid range 1\.\.1024'),
    ({'num_videos_per_prompt': 0}, ValueError, r'num_videos_per_prompt=0 is outside the valid range 1\.\.256'),
    ({'text': ['a', 'b'], 'negative_prompt': ['x', 'y', 'z']}, ValueError,
     r'negative_prompt has 3 entries but text has 2'),
    ({'negative_prompt': ['x', 5]}, TypeError, r'negative_prompt must hold strings; got 5 \(int\)'),
    ({'output_video': '{tmp}/missing/out.mp4'}, ValueError,
     r"output_video=.*missing/out\.mp4'.*folder .*missing' does not exist"),
    ({'output_video': '{tmp}/out.avi'}, ValueError,
     r"output_video=.*out\.avi'.*extension '\.avi'; supported: \.mp4, \.mkv, \.mov, \.webm, \.gif"),
    ({'output_video': '{tmp}/out.mp4', 'output_type': 'frames'}, ValueError,
     r"output_video=.*out\.mp4' is given but output_type='frames'"),
    ({'output_type': 'gif'}, ValueError, r"output_type='gif' is not one of \['video', 'frames', 'latents'\]"),
    ({'stepz': 20}, ValueError, r"unknown generation options \['stepz'\]; valid ones are \[.*'num_inference_steps'"),
    ({'seed': -1}, ValueError, r'seed=-1 is outside the valid range 0\.\.9223372036854775807'),
    ({'seed': 2 ** 63 - 2, 'num_videos_per_prompt': 3}, ValueError,
     r'seed=9223372036854775806 with 3 videos would use seeds up to 9223372036854775808, past the largest, '
     r'9223372036854775807: choose a seed of at most 9223372036854775805'),
    ({'seed': 1.5}, TypeError, r'seed must be an integer in 0\.\.9223372036854775807, not 1\.5'),
    ({'seed': True}, TypeError, r'seed must be an integer in 0\.\.9223372036854775807, not True'),
    ({'num_frames': True}, TypeError, r'num_frames must be an integer in 1\.\.1024, not True'),
    ({'guidance_scale': False}, TypeError, r'guidance_scale must be a number in \[0\.0, 100\.0\], not False'),
    ({'show_progress': 1}, TypeError, r'show_progress must be True, False or None, not 1'),
    ({'callback': 'stop'}, TypeError, r"callback must be callable as callback\(step, timestep, latents\), not 'stop'"),
    ({'generator': 7}, TypeError, r'generator must be a torch\.Generator, not int'),
    ({'latents': torch.zeros(1, 4, 16, 32, 31)}, ValueError,
     r'latents have shape \(1, 4, 16, 32, 31\); this request needs \(1, 4, 16, 32, 32\)'),
    ({'text': ['a', 'b'], 'latents': torch.zeros(1, 4, 16, 32, 32)}, ValueError,
     r'latents have shape \(1, 4, 16, 32, 32\); this request needs \(2, 4, 16, 32, 32\)'),
    ({'latents': torch.zeros(1, 4, 16, 32, 32, device='meta')}, ValueError,
     r'latents are on the meta device, which holds shapes but no values'),
    ({'latents': torch.zeros(1, 4, 16, 32, 32).to_sparse()}, TypeError,
     r'latents must be a dense tensor, not one of layout torch\.sparse_coo'),
    ({'output_video': '{tmp}/a\0b.mp4'}, ValueError, r"output_video=.*: output path .* holds a NUL character"),
    ({'output_video': '{tmp}/' + 'a' * 300 + '.mp4'}, ValueError,
     r"output_video=.*: file name 'a+'\.\.\. is 304 bytes long; the file system of .* takes names of up to 255"),
    ({'output_video': '{tmp}/in the way/v.mp4', 'num_videos_per_prompt': 3}, ValueError,
     r"output_video=.*: output path .*in the way/v-1\.mp4' is a folder, not a file name"),
    ({'latents': torch.zeros(1, 4, 16, 32, 32, dtype=torch.long)}, TypeError,
     r'latents must be a floating-point torch\.Tensor'),
]


def _case_id(options: dict) -> str:
    show = lambda v: (f'{v.dtype}{tuple(v.shape)}{v.device.type}{v.layout}' if isinstance(v, torch.Tensor)  # noqa: E731
                      else repr(v)[:40])
    return ','.join(f'{k}={show(v)}' for k, v in options.items())


@pytest.mark.parametrize('options, error, message', BAD, ids=[_case_id(o) for o, _, _ in BAD])
def test_bad_value_is_refused_with_key_value_and_range(options, error, message, tmp_path):
    options = {k: v.format(tmp=tmp_path) if k == 'output_video' else v for k, v in options.items()}
    (tmp_path / 'in the way' / 'v-1.mp4').mkdir(parents=True)   # a folder where the second video would go
    with pytest.raises(error, match=message):
        parse_request({**PROMPT, **options}, TINY)


def test_unknown_sampler_message_lists_every_valid_name():
    with pytest.raises(ValueError) as info:
        parse_request(PROMPT, TINY, sampler='euler_a')
    listed = re.search(r'choose one of (\[.*?\])', str(info.value))[1]
    assert listed == str(sorted(SAMPLERS))


def test_unknown_option_message_lists_every_valid_key():
    with pytest.raises(ValueError) as info:
        parse_request(PROMPT, TINY, steps=20)
    assert str(sorted(INPUT_KEYS)) in str(info.value)


@pytest.mark.parametrize('inputs, error, message', [
    (None, TypeError, r"input must be a dict like \{'text': 'a prompt'\} or a string, not NoneType"),
    ({'seed': 1}, ValueError, r"input has no 'text'"),
])
def test_bad_input_container(inputs, error, message):
    with pytest.raises(error, match=message):
        parse_request(inputs, TINY)


def test_defaults():
    r = parse_request(PROMPT, replace(TINY, max_frames=24))
    assert r.prompts == ('a panda eating bamboo',)
    assert r.negative_prompts == ('',)
    assert r.num_frames == 24  # configuration.json's max_frames
    assert (r.height, r.width) == (256, 256)
    assert r.num_inference_steps == 50
    assert r.guidance_scale == 9.0
    assert r.sampler == 'ddim'
    assert r.fps == 8.0
    assert r.eta == 0.0
    assert r.output_type == 'video' and r.output_video is None
    assert r.num_videos_per_prompt == 1
    assert r.generator is None and r.latents is None and r.callback is None
    assert isinstance(r.seed, int) and 0 <= r.seed < 2 ** 31  # drawn, then reported
    assert r.seeds() == [r.seed]


def test_builtin_rules_are_modelscopes_pipeline(caplog):
    """Through pipeline(): unknown keys dropped, sizes rounded down, no seed (torch's global generator);
    every known value is checked all the same."""
    r = parse_request({**PROMPT, 'out_height': 256, 'height': 263}, TINY, builtin_rules=True, fps=12, zoom=2)
    assert (r.height, r.width, r.fps, r.seed, r.seeds()) == (256, 256, 12.0, None, [None])
    assert "ignoring unknown generation options ['out_height', 'zoom']" in caplog.text
    for bad, message in (({'height': 7}, r'height=7 is outside the valid range 8\.\.4096'),
                         ({'seed': -1}, r'seed=-1 is outside'), ({'eta': 2}, r'eta=2\.0 is outside')):
        with pytest.raises(ValueError, match=message):
            parse_request({**PROMPT, 'out_height': 256, **bad}, TINY, builtin_rules=True)


def test_output_video_is_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_request(PROMPT, TINY, output_video='./a.mkv').output_video == './a.mkv'
    path = tmp_path / 'b.mov'
    assert parse_request(PROMPT, TINY, output_video=path).output_video is path


def test_string_input_is_the_prompt():
    assert parse_request('a cat', TINY).prompts == ('a cat',)


def test_keyword_arguments_override_the_input_dict(tmp_path):
    inputs = {'text': 'a cat', 'seed': 1, 'num_frames': 4, 'height': 64, 'width': 64,
              'num_inference_steps': 2, 'guidance_scale': 3.0, 'sampler': 'euler', 'fps': 10}
    r = parse_request(inputs, TINY, text='a dog', seed=2, num_frames=8, height=128, width=96,
                      num_inference_steps=5, guidance_scale=1.0, sampler='dpm++2m', fps=12,
                      output_video=str(tmp_path / 'x.webm'))
    assert r.prompts == ('a dog',)
    assert (r.seed, r.num_frames, r.height, r.width) == (2, 8, 128, 96)
    assert (r.num_inference_steps, r.guidance_scale, r.sampler, r.fps) == (5, 1.0, 'dpm++2m', 12.0)
    assert r.output_video == str(tmp_path / 'x.webm')
    # a keyword argument of None leaves the dict's value
    assert parse_request(inputs, TINY, seed=None).seed == 1
    assert inputs['text'] == 'a cat'  # the caller's dict is not modified


def test_prompt_lists_and_negative_prompts():
    r = parse_request({'text': ['a', 'b'], 'negative_prompt': 'blurry', 'seed': 10,
                       'num_videos_per_prompt': 3}, TINY)
    assert r.prompts == ('a', 'b') and r.negative_prompts == ('blurry', 'blurry')
    assert r.num_videos == 6 and r.seeds() == [10, 11, 12, 13, 14, 15]
    r = parse_request({'text': ('a', 'b'), 'negative_prompt': ['x', 'y']}, TINY)
    assert r.negative_prompts == ('x', 'y')


def test_valid_edge_values_are_accepted(tmp_path):
    latents = torch.zeros(2, 4, 1, 1, 2)
    r = parse_request({'text': ['a', 'b'], 'num_frames': 1, 'height': 8, 'width': 16, 'seed': 0,
                       'num_inference_steps': 1000, 'guidance_scale': 0, 'latents': latents,
                       'output_video': str(tmp_path / 'a.GIF')}, TINY)
    assert (r.num_frames, r.height, r.width, r.seed, r.num_inference_steps) == (1, 8, 16, 0, 1000)
    assert r.latents is latents and r.seeds() == [None, None]
    g = torch.Generator().manual_seed(3)
    assert parse_request(PROMPT, TINY, generator=g, seed=2 ** 63 - 1).generator is g


def test_diffusers_scheduler_instance_is_accepted():
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler()
    assert parse_request(PROMPT, TINY, sampler=scheduler).sampler is scheduler
