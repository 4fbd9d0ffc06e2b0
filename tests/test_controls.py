"""Every generation control on the tiny model: each test fails if its control is ignored."""

import json
import logging
import os
import tempfile

import numpy as np
import pytest
import torch

from modelscope_t2v import GenerationCancelled, parse_request
from modelscope_t2v.config import FULL
from modelscope_t2v.sampling import denoise
from modelscope_t2v.schedulers import SAMPLERS, make_scheduler
from modelscope_t2v.text_to_video import activation_bytes, to_uint8_frames
from modelscope_t2v.video_io import probe_video

PROMPT = 'a panda playing the guitar'
SMALL = {'num_frames': 4, 'height': 64, 'width': 64, 'num_inference_steps': 2}
LATENT = (4, 4, 8, 8)  # (c, f, h/8, w/8) of SMALL
# the training schedule, written out: what diffusers' schedulers are configured with
SCHEDULE = {'num_train_timesteps': 1000, 'beta_start': 0.00085, 'beta_end': 0.012,
            'beta_schedule': 'scaled_linear', 'timestep_spacing': 'leading', 'steps_offset': 1}


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def generate(tiny_engine):
    """generate(text=PROMPT, **options) -> GenerationResult, SMALL unless overridden."""
    def run(text=PROMPT, **options):
        return tiny_engine(parse_request({'text': text}, tiny_engine.config, **{**SMALL, **options}))
    return run


@pytest.fixture
def unet_inputs(tiny_engine):
    """The latents x (b c f h w) of every UNet call, recorded by wrapping the UNet's forward."""
    unet, calls = tiny_engine.unet, []
    forward = unet.forward

    def record(x, t, context):
        calls.append(x.clone())
        return forward(x, t, context)

    unet.forward = record  # an instance attribute: nn.Module.__call__ finds it first
    yield calls
    del unet.forward


def original_draw(seed, shape=(1,) + LATENT):
    """The original's starting noise: the global generator seeded, then one randn."""
    torch.manual_seed(seed)
    return torch.randn(shape)


def max_diff(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


# --- seed, generator, latents ---------------------------------------------------------------

def test_seed_gives_the_originals_starting_noise(generate, unet_inputs):
    generate(seed=1234, guidance_scale=1.0, output_type='latents')
    assert torch.equal(unet_inputs[0], original_draw(1234))


def test_same_seed_same_frames_other_seed_other_noise(generate, unet_inputs):
    a = generate(seed=5, output_type='frames')
    b = generate(seed=5, output_type='frames')
    c = generate(seed=6, output_type='frames')
    steps = SMALL['num_inference_steps']
    noise_a, noise_b, noise_c = unet_inputs[0], unet_inputs[steps], unet_inputs[2 * steps]
    assert torch.equal(noise_a, noise_b)
    assert max_diff(noise_a, noise_c) > 1.0
    assert np.array_equal(a.frames[0], b.frames[0])
    assert max_diff(a.frames[0], c.frames[0]) > 10
    assert [r.parameters[0]['seed'] for r in (a, b, c)] == [5, 5, 6]


@pytest.mark.parametrize('sampler, options', [('euler-a', {}), ('dpm++sde', {}), ('ddim', {'eta': 1.0})])
def test_seed_fixes_the_noise_of_stochastic_samplers(generate, sampler, options):
    a, b, c = (generate(seed=seed, sampler=sampler, output_type='latents', **options).latents
               for seed in (8, 8, 9))
    assert torch.equal(a, b)
    assert max_diff(a, c) > 0.1


def test_seeded_step_noise_is_drawn_on_the_engines_device(generate, tiny_engine, monkeypatch):
    made, real_generator = [], torch.Generator   # on a GPU a CPU generator's draws would wait for the GPU

    def recorded(*args, **kwargs):   # the devices named by each generator made (none: the CPU by default)
        made.append(args + tuple(kwargs.values()))
        return real_generator(*args, **kwargs)

    monkeypatch.setattr(torch, 'Generator', recorded)
    drawn = generate(seed=8, sampler='euler-a', output_type='latents').latents
    assert (tiny_engine.device,) in made
    monkeypatch.setattr(torch, 'Generator', real_generator)
    assert torch.equal(drawn, generate(seed=8, sampler='euler-a', output_type='latents').latents)


def test_batch_seeds_are_seed_plus_video_index(generate, unet_inputs):
    result = generate(text=['a cat', 'a dog'], num_videos_per_prompt=2, seed=100, guidance_scale=1.0,
                      output_type='latents')
    assert [p['seed'] for p in result.parameters] == [100, 101, 102, 103]
    assert [p['text'] for p in result.parameters] == ['a cat', 'a cat', 'a dog', 'a dog']
    noise = unet_inputs[0]
    assert noise.shape == (4,) + LATENT
    for i in range(4):
        assert torch.equal(noise[i:i + 1], original_draw(100 + i)), f'video {i}'


def test_generator_draws_the_noise(generate, unet_inputs):
    runs = [generate(generator=torch.Generator().manual_seed(s), seed=1, guidance_scale=1.0,
                     output_type='frames') for s in (7, 7, 70)]
    steps = SMALL['num_inference_steps']
    assert torch.equal(unet_inputs[0], torch.randn((1,) + LATENT, generator=torch.Generator().manual_seed(7)))
    assert max_diff(unet_inputs[0], original_draw(1)) > 1.0  # the generator wins over the seed
    assert torch.equal(unet_inputs[0], unet_inputs[steps])
    assert max_diff(unet_inputs[0], unet_inputs[2 * steps]) > 1.0
    assert np.array_equal(runs[0].frames[0], runs[1].frames[0])
    assert max_diff(runs[0].frames[0], runs[2].frames[0]) > 10
    assert runs[0].parameters[0]['seed'] is None  # a generator's noise has no seed to report


def test_latents_are_the_starting_noise(generate, unet_inputs):
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn((2, 1) + LATENT, generator=g)
    a = generate(latents=first, seed=1, guidance_scale=1.0, output_type='frames')
    b = generate(latents=first.clone(), seed=2, guidance_scale=1.0, output_type='frames')
    c = generate(latents=second, seed=1, guidance_scale=1.0, output_type='frames')
    assert torch.equal(unet_inputs[0], first)
    assert np.array_equal(a.frames[0], b.frames[0])  # the latents win over the seed
    assert max_diff(a.frames[0], c.frames[0]) > 10


# --- guidance -------------------------------------------------------------------------------

@pytest.mark.parametrize('scale, texts', [(1.0, 2), (9.0, 4)])
def test_guidance_scale_sets_texts_per_unet_call(generate, tiny_engine, scale, texts):
    """Guidance gives the UNet each video's two texts in one call (the videos once: UNet3D shares its first layers);
    the UNet remembers them for the generation, so each call passes no context."""
    forward, batches = tiny_engine.unet.forward, []

    def record(x, t, context=None):
        batches.append((x.shape[0], t.shape[0], context, tiny_engine.unet.remembered_texts))
        return forward(x, t, context)

    tiny_engine.unet.forward = record
    try:
        result = generate(text=['a cat', 'a dog'], seed=3, guidance_scale=scale, num_inference_steps=3,
                          output_type='latents')
    finally:
        del tiny_engine.unet.forward
    assert batches == [(2, 2, None, texts)] * 3  # one call per step
    assert result.parameters[0]['guidance_scale'] == scale


def test_guidance_scale_changes_the_result(generate):
    low, high = (generate(seed=3, guidance_scale=s, output_type='latents').latents for s in (2.0, 9.0))
    assert max_diff(low, high) > 0.1


# --- frames, size, fps and containers -------------------------------------------------------

def test_num_frames(generate, tmp_path):
    generate(seed=1, num_frames=24, output_video=str(tmp_path / 'a.mp4'))
    info = probe_video(tmp_path / 'a.mp4')
    assert (info['frames'], info['codec'], info['pix_fmt']) == (24, 'h264', 'yuv420p')


def test_height_and_width(generate):
    frames = generate(seed=1, height=64, width=128, output_type='frames').frames[0]
    assert frames.shape == (4, 64, 128, 3)


def test_fps(generate, tmp_path):
    generate(seed=1, fps=12, output_video=str(tmp_path / 'a.mp4'))
    assert probe_video(tmp_path / 'a.mp4')['fps'] == 12


def test_gif_output(generate, tmp_path):
    generate(seed=1, num_frames=5, height=64, width=128, output_video=str(tmp_path / 'a.gif'))
    info = probe_video(tmp_path / 'a.gif')
    assert (info['codec'], info['frames'], info['width'], info['height']) == ('gif', 5, 128, 64)


def test_webm_output_is_vp9(generate, tmp_path):
    generate(seed=1, output_video=str(tmp_path / 'a.webm'))
    info = probe_video(tmp_path / 'a.webm')
    assert (info['codec'], info['frames'], info['width'], info['height']) == ('vp9', 4, 64, 64)


def test_batch_of_prompts_and_videos_per_prompt(generate, tmp_path):
    prompts = ['a cat', 'a dog', 'a fish']
    result = generate(text=prompts, num_videos_per_prompt=2, seed=40,
                      output_video=str(tmp_path / 'name.mp4'))
    names = [f'name-{i}.mp4' for i in range(6)]
    assert sorted(os.listdir(tmp_path)) == names  # no name.mp4, no temp files
    assert result.paths == [str(tmp_path / n) for n in names]
    assert [p['text'] for p in result.parameters] == [p for p in prompts for _ in range(2)]
    assert [p['seed'] for p in result.parameters] == list(range(40, 46))
    assert [p['output_video'] for p in result.parameters] == result.paths
    assert probe_video(result.paths[5])['frames'] == 4
    assert max_diff(result.frames[0], result.frames[1]) > 10  # same prompt, other seed


# --- samplers -------------------------------------------------------------------------------

def test_every_sampler_runs_and_gives_its_own_result(generate):
    final = {}
    for name in SAMPLERS:
        steps = []
        result = generate(seed=2, sampler=name, num_inference_steps=3, output_type='frames',
                          callback=lambda i, t, x: steps.append(x))
        final[name] = steps[-1]
        assert torch.isfinite(final[name]).all(), name
        assert result.frames[0].shape == (4, 64, 64, 3) and result.frames[0].dtype == np.uint8, name
        assert result.parameters[0]['sampler'] == name
    names = list(final)
    for i, a in enumerate(names):  # a sampler that is ignored would repeat another's latents
        for b in names[i + 1:]:
            assert max_diff(final[a], final[b]) > 1e-2, (a, b)


def test_diffusers_scheduler_instance_is_used(generate):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    ddim = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type='dpmsolver++', solver_order=2)
    run = lambda sampler: generate(seed=4, sampler=sampler, num_inference_steps=3,  # noqa: E731
                                   output_type='latents')
    by_name = {name: run(name).latents for name in ('ddim', 'dpm++2m')}
    with_ddim, with_dpm = run(ddim), run(dpm)
    assert torch.equal(with_ddim.latents, by_name['ddim'])
    assert torch.equal(with_dpm.latents, by_name['dpm++2m'])
    assert max_diff(with_ddim.latents, with_dpm.latents) > 0.1
    assert with_dpm.parameters[0]['sampler'] == 'DPMSolverMultistepScheduler'


def test_dpmpp_2m_matches_diffusers_own_loop():
    from diffusers import DPMSolverMultistepScheduler

    def eps_model(x, t, context):
        # closed form: eps = c(t) x + context, with c rising from 0.2 (t=0) to 0.8 (t=1000)
        c = (0.2 + 0.6 * t.to(x.dtype) / 1000).view(-1, 1, 1, 1, 1)
        return c * x + context

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 3, 8, 8, generator=g)
    context = 0.05 * torch.randn(2, 1, 1, 1, 1, generator=g)
    ours = denoise(eps_model, noise, context, make_scheduler('dpm++2m', FULL.diffusion), 20)

    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type='dpmsolver++', solver_order=2)
    scheduler.set_timesteps(20)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(eps_model(x_in, t.expand(2), context), t, x).prev_sample
    worst = max_diff(ours, x)
    print(f'dpm++2m, 20 steps vs diffusers loop: worst |diff| {worst:.2e}')
    assert len(scheduler.timesteps) == 20
    assert max_diff(x, noise) > 0.5  # the loop did move the latents
    assert worst <= 1e-6


# --- callback and cancellation --------------------------------------------------------------

def test_callback_sees_every_step(generate):
    seen = []
    result = generate(seed=1, num_inference_steps=5, output_type='latents',
                      callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert [i for i, _, _ in seen] == [0, 1, 2, 3, 4]
    assert [t for _, t, _ in seen] == [801, 601, 401, 201, 1]  # the original's DDIM-5 timesteps
    assert all(x.shape == (1,) + LATENT for _, _, x in seen)
    assert torch.equal(seen[-1][2], result.latents)


def _stop_by_returning_false(i, t, x):
    return i != 3


def _stop_by_raising(i, t, x):
    if i == 3:
        raise GenerationCancelled('stop')


@pytest.mark.parametrize('stop', [_stop_by_returning_false, _stop_by_raising])
def test_callback_cancels_and_leaves_no_file(generate, tmp_path, stop):
    steps = []

    def callback(i, t, x):
        steps.append(i)
        return stop(i, t, x)

    target = tmp_path / 'out.mp4'
    with pytest.raises(GenerationCancelled):
        generate(seed=1, num_inference_steps=6, callback=callback, output_video=str(target))
    assert steps == [0, 1, 2, 3]
    assert not target.exists() and os.listdir(tmp_path) == []


# --- output types ---------------------------------------------------------------------------

@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """The system temp folder, redirected to an empty folder of this test."""
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    return tmp_path


def test_output_type_latents_and_frames_write_nothing(generate, tiny_engine, temp_folder):
    latents = generate(text=['a cat', 'a dog'], seed=9, output_type='latents')
    frames = generate(text=['a cat', 'a dog'], seed=9, output_type='frames')
    assert os.listdir(temp_folder) == []
    assert latents.latents.shape == (2,) + LATENT and latents.latents.dtype == torch.float32
    assert latents.frames == [] and latents.paths == []
    assert frames.latents is None and frames.paths == [] and len(frames.frames) == 2
    assert all(f.dtype == np.uint8 and f.shape == (4, 64, 64, 3) for f in frames.frames)
    with torch.no_grad():  # the frames are the decoded latents
        decoded = to_uint8_frames(tiny_engine.autoencoder.decode_video(latents.latents))
    assert np.array_equal(np.stack(frames.frames), decoded)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_uint8_frames_truncate_as_the_originals_numpy(dtype):
    video = (torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.7).to(dtype)
    as_numpy = np.clip(video.float().numpy() * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 4, 1)
    expected = (as_numpy * 255).astype(np.uint8)   # the original's post-processing
    got = to_uint8_frames(video)
    assert got.dtype == np.uint8 and got.shape == (2, 4, 8, 8, 3)
    assert np.array_equal(got, expected) and 0 < (got == 0).sum() and 0 < (got == 255).sum()


def test_prompts_and_negatives_are_encoded_in_one_pass(tiny_engine):
    passes = []
    hook = tiny_engine.text_encoder.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape))
    try:
        context, uncond = tiny_engine.encode_prompts(['a cat', 'a dog'], ['', 'blurry'])
    finally:
        hook.remove()
    separate = [tiny_engine.encode_text([text]) for text in ('a cat', 'a dog', '', 'blurry')]
    assert passes == [(4, 77)]
    assert max_diff(torch.cat([context, uncond]), torch.cat(separate)) < 1e-5
    assert tiny_engine.encode_prompts(['a cat'])[1] is None


def test_output_type_video_without_path_writes_a_temp_mp4(generate, temp_folder):
    result = generate(seed=9)
    assert [os.path.dirname(p) for p in result.paths] == [str(temp_folder)]
    assert os.listdir(temp_folder) == [os.path.basename(result.paths[0])]
    assert probe_video(result.paths[0])['frames'] == 4


# --- metadata and logging -------------------------------------------------------------------

def test_mp4_metadata_regenerates_the_video(generate, tiny_engine, tiny_model_dir, tmp_path):
    result = generate(seed=11, sampler='dpm++2m', num_inference_steps=3, guidance_scale=7.5,
                      negative_prompt='blurry', output_video=str(tmp_path / 'a.mp4'))
    params = json.loads(probe_video(tmp_path / 'a.mp4')['comment'])
    assert {k: params[k] for k in ('text', 'negative_prompt', 'seed', 'sampler', 'num_inference_steps',
                                   'guidance_scale', 'num_frames', 'height', 'width', 'fps')} == {
        'text': PROMPT, 'negative_prompt': 'blurry', 'seed': 11, 'sampler': 'dpm++2m',
        'num_inference_steps': 3, 'guidance_scale': 7.5, 'num_frames': 4, 'height': 64, 'width': 64,
        'fps': 8.0}
    assert params['model_dir'] == tiny_model_dir
    params.pop('model_dir')
    again = tiny_engine(parse_request(params, tiny_engine.config, output_type='frames'))
    assert np.array_equal(again.frames[0], result.frames[0])


def test_long_prompt_warns_about_truncation(generate, caplog):
    with caplog.at_level(logging.WARNING, logger='modelscope_t2v'):
        generate(text='a short prompt', seed=1, num_inference_steps=1, output_type='latents')
        assert not [r for r in caplog.records if 'truncat' in r.getMessage()]
        generate(text='a red ball ' * 40, seed=1, num_inference_steps=1, output_type='latents')
        generate(text='a red ball ' * 10_000, seed=1, num_inference_steps=1, output_type='latents')
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and 'truncat' in r.getMessage()]
    assert len(warnings) == 2 and '122 tokens' in warnings[0] and '30002 tokens' in warnings[1]
    assert warnings[1] == ("prompt of 30002 tokens truncated to the text encoder's 77: 'a red ball a red ball a red "
                           "ball a red ball a red ball a red'... (110000 characters)")   # 144 characters, not 110 000


# --- through ModelScope's pipeline ----------------------------------------------------------

@pytest.fixture(scope='module')
def ms_pipeline(tiny_model_dir):
    from modelscope.pipelines import pipeline
    import modelscope_t2v  # noqa: F401  registers the pipeline
    return pipeline('text-to-video-synthesis', tiny_model_dir, device='cpu')


def test_pipeline_options_as_dict_keys_or_keyword_args(ms_pipeline, generate):
    options = {'seed': 3, 'num_frames': 4, 'height': 64, 'width': 64, 'num_inference_steps': 2}
    as_keys = ms_pipeline({'text': PROMPT, **options}, output_type='frames')
    as_kwargs = ms_pipeline({'text': PROMPT}, output_type='frames', **options)
    overridden = ms_pipeline({'text': PROMPT, **options, 'seed': 4}, output_type='frames', seed=3)
    other = ms_pipeline({'text': PROMPT, **options, 'seed': 4}, output_type='frames')
    assert as_keys['frames'].shape == (4, 64, 64, 3) and as_keys['output_video'] is None
    assert as_keys['parameters']['seed'] == as_kwargs['parameters']['seed'] == 3
    assert np.array_equal(as_keys['frames'], as_kwargs['frames'])
    assert np.array_equal(as_keys['frames'], overridden['frames'])  # keyword args win
    assert max_diff(as_keys['frames'], other['frames']) > 10
    # the same networks and request through the engine directly
    assert np.array_equal(as_keys['frames'], generate(seed=3, output_type='frames').frames[0])


def test_pipeline_writes_the_requested_video(ms_pipeline, tmp_path):
    out = ms_pipeline({'text': [PROMPT, 'a cat'], 'seed': 3, 'num_frames': 6, 'height': 64, 'width': 64,
                       'num_inference_steps': 2, 'fps': 12}, output_video=str(tmp_path / 'v.webm'))
    assert out['output_video'] == [str(tmp_path / 'v-0.webm'), str(tmp_path / 'v-1.webm')]
    assert [p['seed'] for p in out['parameters']] == [3, 4]
    info = probe_video(out['output_video'][1])
    assert (info['codec'], info['frames'], info['fps']) == ('vp9', 6, 12)


# --- memory ---------------------------------------------------------------------------------

def test_activation_estimate_of_the_real_model():
    """text_to_video.activation_bytes, 256x256, 16 frames, float16, guidance on, 4-frame decode chunks:
    the decoder's chunk is the larger part (the figures of its docstring)."""
    request = parse_request('a cat', FULL, seed=1)
    unet = 2 * 16 * 32 * 32 * 2 * (1620 + 8 * 320)                  # rows x cells x bytes x channels: 0.26 GiB
    decode = 4 * 256 * 256 * 2 * (2 * 256 + 128) + 16 * 3 * 256 * 256 * 2   # chunk, then the decoded frames
    latents = 2 * 16 * 4 * 32 * 32 * 2 + 16 * 4 * 32 * 32 * 4
    assert unet == 273_940_480 and decode == 341_835_776
    assert activation_bytes(FULL, request, torch.float16, 4) == max(unet, decode) + latents == 342_360_064


def test_a_request_the_device_cannot_hold_is_refused_before_any_model_work(tiny_engine, monkeypatch):
    """4096x4096, 1024 frames on the CPU: refused with the figures, not by the allocator (or the swap) minutes
    in. On the tiny model at 512x512, 8 frames (1 step, float32) the estimate is 794 MiB and the process's
    peak resident memory grows by 1608 MiB (ru_maxrss): the estimate is a lower bound."""
    encoded = []
    monkeypatch.setattr(tiny_engine, 'encode_prompts', lambda *args: encoded.append(args))
    request = parse_request('a cat', tiny_engine.config, height=4096, width=4096, num_frames=1024)
    need = activation_bytes(tiny_engine.config, request, torch.float32, None)
    decode = 1024 * 4096 * 4096 * 4 * (2 * 32 + 32) + 1024 * 3 * 4096 * 4096 * 4   # all frames at once on the CPU
    latents = 2 * 1024 * 4 * 512 * 512 * 4 + 1024 * 4 * 512 * 512 * 4
    assert need == decode + latents == 6_816_113_098_752   # 6.2 TiB
    with pytest.raises(ValueError, match=r'^1 video\(s\) of 1024 frames of 4096x4096 need at least 6348\.0 GiB of '
                                         r'cpu memory besides the weights; this cpu has [\d.]+ GiB\. Ask for fewer'):
        tiny_engine(request)
    assert encoded == []
    small = parse_request('a cat', tiny_engine.config, height=512, width=512, num_frames=8, num_inference_steps=1)
    assert activation_bytes(tiny_engine.config, small, torch.float32, None) / 2 ** 20 == pytest.approx(793.5)
