"""Video-to-video against diffusers' VideoToVideoSDPipeline, image-to-video, and long videos (FreeNoise)."""

import warnings

import numpy as np
import pytest
import torch
from diffusers_reference import CONFIG, diffusers_pipeline
from reference import rel_err

from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v.models.frame_windows import window_starts, window_weights, windowed
from modelscope_t2v.sampling import reschedule_noise
from modelscope_t2v.schedulers import SAMPLERS
from modelscope_t2v.tools.make_random_model import write_model_dir
from modelscope_t2v.video_io import read_frames, write_video

PROMPT = 'A panda eating bamboo on a rock.'
TOLERANCE = 1e-4   # float32, two implementations of the same steps
pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def pipe():
    return diffusers_pipeline()


@pytest.fixture(scope='module')
def engine(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp('v2v') / 'model'
    pipe.save_pretrained(folder)
    return TextToVideo.from_pretrained(str(folder), device='cpu')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return TextToVideo.from_pretrained(write_model_dir(str(tmp_path_factory.mktemp('tiny')), CONFIG), device='cpu')


def frames_of(seed, f=4, h=64, w=64) -> np.ndarray:
    """A smooth random clip, uint8 (f, h, w, 3)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(f, 3, h // 8, w // 8, generator=g)
    return (torch.nn.functional.interpolate(small, size=(h, w), mode='bilinear') * 255).round().byte() \
        .permute(0, 2, 3, 1).numpy()


def run(engine, **options):
    request = parse_request({'text': PROMPT, 'seed': 3}, engine.config,
                            **{'num_inference_steps': 10, 'height': 64, 'width': 64, **options})
    return engine(request)


# -- video-to-video --------------------------------------------------------------------------

@pytest.mark.parametrize('strength', [0.6, 1.0])
def test_video_to_video_equals_diffusers(pipe, engine, strength):
    from diffusers import VideoToVideoSDPipeline
    v2v = VideoToVideoSDPipeline(**pipe.components)
    v2v.set_progress_bar_config(disable=True)
    video = frames_of(1)
    theirs = v2v(PROMPT, video=video.astype(np.float32) / 255, strength=strength, num_inference_steps=10,
                 guidance_scale=9.0, generator=torch.Generator().manual_seed(5), output_type='latent').frames
    ours = run(engine, init_video=video, strength=strength, generator=torch.Generator().manual_seed(5),
               guidance_scale=9.0, height=64, width=64, output_type='latents').latents
    err = rel_err(ours, theirs)
    print(f'VideoToVideoSDPipeline, strength {strength}: worst relative error {err:.2e}')
    assert err < TOLERANCE


def test_strength_runs_its_share_of_the_steps_with_every_sampler(tiny):
    calls = []
    forward = tiny.unet.forward
    tiny.unet.forward = lambda *args: calls.append(1) or forward(*args)
    try:
        for sampler in SAMPLERS:
            calls.clear()
            out = run(tiny, init_video=frames_of(2), strength=0.5, sampler=sampler, output_type='latents')
            # 5 of 10 steps; Heun's 19 timesteps (two model calls a step but the last) from the 11th: 9 calls
            assert len(calls) == (9 if sampler == 'heun' else 5), (sampler, len(calls))
            assert torch.isfinite(out.latents).all() and out.parameters[0]['strength'] == 0.5
    finally:
        del tiny.unet.forward


def test_a_video_file_is_read_resized_and_looped(tiny, tmp_path):
    path = tmp_path / 'clip.mp4'
    write_video(frames_of(4, f=3, h=48, w=80), path)
    from_file = run(tiny, init_video=str(path), num_frames=5, height=64, width=64, output_type='latents')
    decoded = read_frames(path)   # the file's frames, as read
    from_array = run(tiny, init_video=decoded, num_frames=5, height=64, width=64, output_type='latents')
    assert from_file.latents.shape == (1, 4, 5, 8, 8)
    assert torch.equal(from_file.latents, from_array.latents)
    assert run(tiny, init_video=str(path), height=64, width=64, output_type='latents').latents.shape[2] == 3


def test_the_posterior_mean_without_a_generator_is_deterministic(tiny):
    a, b = (run(tiny, init_video=frames_of(2), output_type='latents').latents for _ in range(2))
    assert torch.equal(a, b)
    c = run(tiny, init_video=frames_of(2), strength=0.9, output_type='latents').latents
    assert (a - c).abs().max() > 1e-3


def test_the_starting_video_is_encoded_in_the_engines_chunks(tiny, monkeypatch):
    """The encode takes the decode's chunks (4 frames on CUDA), not every frame's full-size activations in one
    pass; chunked, the latents are those of one pass to float32 rounding."""
    whole = run(tiny, init_video=frames_of(4, f=6), num_frames=6, output_type='latents').latents
    passes = []
    hook = tiny.autoencoder.encoder.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    monkeypatch.setattr(type(tiny), 'decode_chunk_frames', lambda self, request: 4)
    try:
        chunked = run(tiny, init_video=frames_of(4, f=6), num_frames=6, output_type='latents').latents
    finally:
        hook.remove()
    assert passes == [4, 2]
    assert (chunked - whole).abs().max().item() < 1e-5


@pytest.mark.parametrize('options, error, message', [
    ({'init_video': 'missing.mp4'}, ValueError, r"init_video='missing.mp4': no such file"),
    ({'init_video': np.zeros((0, 8, 8, 3), np.uint8)}, ValueError, r'init_video must have shape \(f, h, w, 3\)'),
    ({'init_video': np.zeros((2, 8, 8, 3))}, TypeError, r'init_video must be a path, uint8 frames'),
    ({'init_video': np.zeros((2, 8, 8, 3), np.uint8), 'strength': 0}, ValueError,
     r'strength=0\.0 is outside the valid range \(0\.0, 1\.0\]'),
    ({'init_video': np.zeros((2, 8, 8, 3), np.uint8), 'strength': 1.5}, ValueError, r'strength=1\.5 is outside'),
    ({'init_video': np.zeros((2, 8, 8, 3), np.uint8), 'strength': 0.01}, ValueError,
     r'strength=0\.01 of num_inference_steps=10 runs no step; use strength of at least 0\.1'),
    ({'strength': 0.5}, ValueError, r'strength is given without init_video'),
    ({'init_video': np.zeros((2, 8, 8, 3), np.uint8), 'init_image': np.zeros((8, 8, 3), np.uint8)}, ValueError,
     r'init_video and init_image are both given'),
    ({'init_image': np.zeros((8, 8), np.uint8)}, ValueError, r'init_image must have shape \(h, w, 3\)'),
    ({'init_video': torch.zeros(1, 4, 3, 8, 8), 'num_frames': 4, 'height': 64, 'width': 64}, ValueError,
     r'init_video latents have shape \(1, 4, 3, 8, 8\); this request needs \(1 or 1, 4, 4, 8, 8\)'),
    ({'num_frames': 24, 'temporal_window': 32}, ValueError,
     r'temporal_window=32 is larger than num_frames=24, the frames it must tile'),
    ({'num_frames': 24, 'temporal_window': 8, 'temporal_stride': 9}, ValueError,
     r'temporal_stride=9 is outside the valid range 1\.\.8'),
])
def test_bad_starts_and_windows_are_refused(tiny, tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        parse_request({'text': PROMPT}, tiny.config, num_inference_steps=10, **options)


def test_a_file_that_is_no_video_is_refused(tiny, tmp_path):
    (tmp_path / 'notes.mp4').write_text('not a video')
    with pytest.raises(ValueError, match=r"init_video=.*notes\.mp4' is not a video or image ffmpeg can read"):
        parse_request({'text': PROMPT}, tiny.config, init_video=str(tmp_path / 'notes.mp4'))


# -- image-to-video --------------------------------------------------------------------------

def test_the_image_is_held_as_the_first_frame(tiny):
    image = frames_of(6, f=1)[0]
    out = run(tiny, init_image=image, num_frames=4, height=64, width=64, output_type='latents')
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float() / 255 * 2 - 1
    with torch.no_grad():
        held = tiny.autoencoder.encode_video(pixels)
    assert torch.equal(out.latents[:, :, :1], held)   # clean after the last step
    assert (out.latents[:, :, 1:] - held).abs().mean() > 0.1
    assert out.parameters[0]['start'] == 'image'


def test_an_image_file_gives_the_same_video_as_its_pixels(tiny, tmp_path):
    from PIL import Image
    image = frames_of(7, f=1)[0]
    Image.fromarray(image).save(tmp_path / 'first.png')
    a = run(tiny, init_image=str(tmp_path / 'first.png'), num_frames=2, height=64, width=64, output_type='latents')
    b = run(tiny, init_image=image, num_frames=2, height=64, width=64, output_type='latents')
    assert torch.equal(a.latents, b.latents)



def test_a_read_only_image_is_taken_without_a_warning(tiny):
    image = frames_of(8, f=1)[0]
    frozen = image.copy()
    frozen.setflags(write=False)   # as np.asarray of a PIL image or a decoded frame
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*not writable')
        a = run(tiny, init_image=frozen, num_frames=2, height=64, width=64, output_type='latents')
    b = run(tiny, init_image=image, num_frames=2, height=64, width=64, output_type='latents')
    assert torch.equal(a.latents, b.latents)

# -- long videos -----------------------------------------------------------------------------

def test_windows_and_weights():
    assert window_starts(16, 16, 4) == [0] and window_starts(40, 16, 4) == [0, 4, 8, 12, 16, 20, 24]
    assert window_starts(25, 16, 4) == [0, 4, 8, 9]
    assert window_weights(4).tolist() == [1, 2, 2, 1] and window_weights(5).tolist() == [1, 2, 3, 2, 1]


def test_windowed_attention_is_plain_within_one_window_and_blends_beyond():
    from modelscope_t2v.models.frame_attention import multi_head_sdpa
    q, k, v = torch.randn(3, 5, 24, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    assert torch.equal(windowed(multi_head_sdpa, 24, 4)(q, k, v), multi_head_sdpa(q, k, v))
    out = windowed(multi_head_sdpa, 16, 8)(q, k, v)   # windows 0-15 and 8-23
    assert torch.allclose(out[:, :8], multi_head_sdpa(q[:, :16], k[:, :16], v[:, :16])[:, :8], atol=1e-6)
    assert torch.allclose(out[:, 16:], multi_head_sdpa(q[:, 8:], k[:, 8:], v[:, 8:])[:, 8:], atol=1e-6)


def test_noise_rescheduling_shuffles_earlier_frames():
    noise = torch.randn(1, 4, 40, 2, 2, generator=torch.Generator().manual_seed(1))
    out = reschedule_noise(noise, 16, 4, torch.Generator().manual_seed(2))
    assert torch.equal(out[:, :, :16], noise[:, :, :16])
    for start in range(16, 40, 4):   # each block: a permutation of the block 16 frames earlier
        block, earlier = out[:, :, start:start + 4], out[:, :, start - 16:start - 12]
        assert sorted(block.sum(dim=(0, 1, 3, 4)).tolist()) == sorted(earlier.sum(dim=(0, 1, 3, 4)).tolist())


def test_a_window_over_all_frames_is_todays_video(tiny):
    base = dict(num_frames=12, height=32, width=32, output_type='latents')
    assert torch.equal(run(tiny, **base).latents, run(tiny, temporal_window=12, **base).latents)


def test_long_videos_run_in_windows(tiny):
    out = run(tiny, num_frames=40, height=32, width=32, num_inference_steps=2, output_type='frames')
    assert out.frames[0].shape == (40, 32, 32, 3)
    assert (out.parameters[0]['temporal_window'], out.parameters[0]['temporal_stride']) == (16, 4)


# -- the command line and the upscale recipe --------------------------------------------------

def cli(*args):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, '-m', 'modelscope_t2v', PROMPT, '--device', 'cpu', '--seed', '2', *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.fixture(scope='module')
def model_dirs(tmp_path_factory):
    """Two tiny models: the first makes 32x32 videos, the second (diffusers' layout, whose UNet's sample_size
    gives its default size) re-renders them at 64x64."""
    import json

    from modelscope_t2v.convert import convert
    root = tmp_path_factory.mktemp('pair')
    second = convert(write_model_dir(str(root / 'second-original'), CONFIG, seed=2), str(root / 'second'), 'diffusers')
    with open(f'{second}/unet/config.json') as f:
        unet = json.load(f)
    with open(f'{second}/unet/config.json', 'w') as f:
        json.dump({**unet, 'sample_size': 8}, f)   # 8 latent cells: 64 pixels
    return write_model_dir(str(root / 'first'), CONFIG, seed=1), second


def test_command_line_video_to_video(model_dirs, tmp_path):
    from modelscope_t2v.video_io import probe_video
    write_video(frames_of(8, f=3, h=32, w=32), tmp_path / 'in.mp4')
    result = cli('--model', model_dirs[0], '--init-video', str(tmp_path / 'in.mp4'), '--strength', '0.5',
                 '--height', '32', '--width', '32', '--steps', '4', '-o', str(tmp_path / 'out.mp4'))
    assert result.returncode == 0, result.stderr
    info = probe_video(tmp_path / 'out.mp4')
    assert (info['frames'], info['width']) == (3, 32)
    assert '"start": "video", "strength": 0.5' in info['comment']


def test_upscale_with_a_second_model(model_dirs, tmp_path, monkeypatch):
    """The command line, then the same in Python, where the first engine is gone before the second loads."""
    import gc
    import json
    import weakref

    from modelscope_t2v import upscale
    from modelscope_t2v.video_io import probe_video
    result = cli('--model', model_dirs[0], '--upscale-with', model_dirs[1], '--num-frames', '2', '--height', '32',
                 '--width', '32', '--steps', '4', '-o', str(tmp_path / 'up.mp4'))
    assert result.returncode == 0, result.stderr
    info = probe_video(tmp_path / 'up.mp4')
    assert (info['frames'], info['width'], info['height']) == (2, 64, 64)
    assert json.loads(info['comment'])['strength'] == 0.65

    loaded, load = [], TextToVideo.from_pretrained

    def tracked(model_dir, **options):
        gc.collect()
        assert all(ref() is None for ref in loaded), 'the first model is still alive'
        engine = load(model_dir, **options)
        loaded.append(weakref.ref(engine))
        return engine
    monkeypatch.setattr(upscale.TextToVideo, 'from_pretrained', tracked)
    out = upscale.generate_and_upscale({'text': PROMPT, 'seed': 2}, model_dirs[0], model_dirs[1], load={'device': 'cpu'},
                                       num_frames=2, height=32, width=32, num_inference_steps=4, output_type='frames')
    assert len(loaded) == 2 and out.frames[0].shape == (2, 64, 64, 3)
