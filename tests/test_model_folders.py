"""Model folders in both layouts: diffusers' own networks saved as diffusers saves them, loaded here and
run against diffusers' TextToVideoSDPipeline; partial original folders; per-model defaults; conversion."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers_reference import CONFIG, clip_tokenizer, diffusers_pipeline
from reference import rel_err

from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v import convert as convert_lib
from modelscope_t2v import model_folder
from modelscope_t2v.model_folder import files_to_download, open_folder
from modelscope_t2v.tools.make_random_model import write_model_dir
from modelscope_t2v.video_io import probe_video

PROMPT = 'A panda eating bamboo on a rock.'
GENERATION_TOLERANCE = 1e-4   # a whole guided DDIM run in float32, two implementations
pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def pipe():
    return diffusers_pipeline()


@pytest.fixture(scope='module')
def saved(pipe, tmp_path_factory):
    """The pipeline saved by save_pretrained: safetensors, with an fp16 variant beside it."""
    path = tmp_path_factory.mktemp('diffusers') / 'model'
    pipe.save_pretrained(path)
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(path, variant='fp16')
    return str(path)


def diffusers_latents(pipe, latents, steps=50, **options):
    out = pipe(PROMPT, latents=latents.clone(), num_inference_steps=steps, guidance_scale=9.0,
               num_frames=latents.shape[2], height=latents.shape[3] * 8, width=latents.shape[4] * 8,
               output_type='latent', **options)
    return out.frames


def our_latents(engine, latents, steps=50):
    request = parse_request({'text': PROMPT}, engine.config, latents=latents.clone(), num_frames=latents.shape[2],
                            temporal_window=latents.shape[2],   # one window: the attention diffusers runs
                            height=latents.shape[3] * 8, width=latents.shape[4] * 8, num_inference_steps=steps,
                            output_type='latents')
    return engine(request).latents


def test_tokenizer_files_tokenize_as_open_clip():
    """Equal ids, but for '!': diffusers' folders name '!' their pad token (id 0, open_clip's padding), so
    transformers splits it out of a prompt, where open_clip, and the original, read '!!' as one word."""
    from modelscope_t2v.tokenizer import tokenize
    hf = clip_tokenizer()
    ids = lambda text: hf(text, padding='max_length', max_length=77, truncation=True,  # noqa: E731
                          return_tensors='pt').input_ids
    for text in (PROMPT, '', 'Hello,   WORLD... 3 cats, ' + 'and dogs ' * 40):
        assert torch.equal(ids(text), tokenize([text])), text
    start, wow = tokenize(['wow'])[0, :2].tolist()
    assert ids('wow!!')[0, :5].tolist() == [start, wow, 0, 0, 49407]                  # '!', '!' as pad tokens
    assert tokenize(['wow!!'])[0, :4].tolist() == [start, wow, hf.vocab['!!</w>'], 49407]   # one word


@pytest.mark.slow
def test_whole_ddim_generation_equals_diffusers_pipeline(pipe, saved):
    """50 guided DDIM steps from the same latents: ours over the saved folder, diffusers' own pipeline."""
    engine = TextToVideo.from_pretrained(saved, device='cpu')
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours, theirs = our_latents(engine, latents), diffusers_latents(pipe, latents)
    err = rel_err(ours, theirs)
    print(f'diffusers TextToVideoSDPipeline, DDIM 50: worst relative error {err:.2e}')
    assert err < GENERATION_TOLERANCE


def test_non_square_24_frames_equal_diffusers(pipe, saved):
    """576x320-like latents (72x40 at an eighth: 9x5) and 24 frames; 3 steps keep it quick."""
    engine = TextToVideo.from_pretrained(saved, device='cpu')
    latents = torch.randn(1, 4, 24, 5, 9, generator=torch.Generator().manual_seed(4))
    err = rel_err(our_latents(engine, latents, steps=3), diffusers_latents(pipe, latents, steps=3))
    print(f'24 frames, 40x72 px: worst relative error {err:.2e}')
    assert err < GENERATION_TOLERANCE


def test_variants_bin_and_shards_load_the_same_tensors(pipe, saved, tmp_path):
    half = open_folder(saved, half=True)
    assert all(files[0].endswith('.fp16.safetensors') for files in half.weights)
    full = open_folder(saved)
    assert all(files[0].endswith('.safetensors') and '.fp16.' not in files[0] for files in full.weights)
    for a, b in zip(model_folder.read_state_dicts(half), model_folder.read_state_dicts(full)):
        assert a.keys() == b.keys() and all(a[k].dtype == torch.float16 for k in a)
        assert all(torch.equal(a[k], b[k].half()) for k in a)

    pipe.save_pretrained(tmp_path / 'bin', safe_serialization=False)
    pipe.save_pretrained(tmp_path / 'shards', max_shard_size='200KB')
    shards = open_folder(str(tmp_path / 'shards'))
    assert len(shards.weights[1]) > 1   # the UNet in several files
    for other in (open_folder(str(tmp_path / 'bin')), shards):
        for a, b in zip(model_folder.read_state_dicts(other), model_folder.read_state_dicts(full)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_loads_a_diffusers_folder(saved):
    """ModelScope's pipeline() on a folder without configuration.json."""
    import modelscope_t2v  # noqa: F401
    from modelscope.outputs import OutputKeys
    from modelscope.pipelines import pipeline
    out = pipeline('text-to-video-synthesis', saved, device='cpu')(
        {'text': PROMPT, 'seed': 1}, num_frames=2, height=64, width=64, num_inference_steps=2)
    assert probe_video(out[OutputKeys.OUTPUT_VIDEO])['frames'] == 2
    assert not os.path.exists(os.path.join(saved, 'configuration.json'))


# -- partial original-format folders (zeroscope's zs2_576w/) ---------------------------------

@pytest.fixture(scope='module')
def original(tmp_path_factory):
    return write_model_dir(str(tmp_path_factory.mktemp('original') / 'model'), CONFIG)


def test_partial_folder_names_what_it_lacks_and_takes_it_from_base_model(original, tmp_path):
    partial = tmp_path / 'zs2_576w'
    partial.mkdir()
    for name in (CONFIG.ckpt_unet, CONFIG.ckpt_clip):
        shutil.copy(os.path.join(original, name), partial / name)
    with pytest.raises(model_folder.CheckpointError) as error:
        TextToVideo.from_pretrained(str(partial), device='cpu')
    message = str(error.value)
    assert 'configuration.json, VQGAN_autoencoder.pth not found' in message and 'base_model=' in message
    engine = TextToVideo.from_pretrained(str(partial), device='cpu', base_model=original)
    request = parse_request({'text': PROMPT, 'seed': 2}, engine.config, num_frames=2, height=32, width=32,
                            num_inference_steps=2, output_type='latents')
    reference = TextToVideo.from_pretrained(original, device='cpu')
    assert torch.equal(engine(request).latents, reference(request).latents)


# -- per-model defaults ----------------------------------------------------------------------

def test_known_fine_tune_defaults_in_a_hub_cache_folder(saved, tmp_path):
    """A hub cache's copy of zeroscope_v2_576w: 576x320, 24 frames, as its card says."""
    snapshot = tmp_path / 'models--cerspense--zeroscope_v2_576w' / 'snapshots' / 'abc123'
    shutil.copytree(saved, snapshot)
    engine = TextToVideo.from_pretrained(str(snapshot), device='cpu')
    result = engine(parse_request({'text': PROMPT, 'seed': 1}, engine.config, num_inference_steps=1,
                                  guidance_scale=1.0, output_type='latents'))
    assert result.latents.shape == (1, 4, 24, 40, 72)
    assert {k: result.parameters[0][k] for k in ('width', 'height', 'num_frames')} == \
        {'width': 576, 'height': 320, 'num_frames': 24}


def test_scheduler_of_a_diffusers_folder_picks_the_default_sampler(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / 'dpm')
    with open(folder / 'scheduler' / 'scheduler_config.json') as f:
        scheduler = json.load(f)
    scheduler.update(_class_name='DPMSolverMultistepScheduler', algorithm_type='dpmsolver++', use_karras_sigmas=True)
    with open(folder / 'scheduler' / 'scheduler_config.json', 'w') as f:
        json.dump(scheduler, f)
    assert open_folder(str(folder)).config.sampler == 'dpm++2m-karras'
    scheduler['prediction_type'] = 'v_prediction'
    with open(folder / 'scheduler' / 'scheduler_config.json', 'w') as f:
        json.dump(scheduler, f)
    with pytest.raises(model_folder.CheckpointError, match="prediction_type='v_prediction' is not supported"):
        open_folder(str(folder))


def test_readme_lists_every_known_model_with_its_defaults():
    from modelscope_t2v.model_zoo import KNOWN_MODELS
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md'), encoding='utf-8') as f:
        rows = [line for line in f if line.startswith('| `')]
    for hub_id, model in KNOWN_MODELS.items():
        [row] = [row for row in rows if row.startswith(f'| `{hub_id}`')]
        assert f'| {model.layout}' in row and f'{model.width}×{model.height}, {model.frames}' in row, row


def test_hub_downloads_only_what_the_layout_needs():
    listing = ['model_index.json', 'README.md', 'zs2_576w/text2video_pytorch_model.pth',
               'scheduler/scheduler_config.json', 'tokenizer/vocab.json', 'tokenizer/merges.txt',
               'unet/config.json', 'unet/diffusion_pytorch_model.bin', 'unet/diffusion_pytorch_model.safetensors',
               'unet/diffusion_pytorch_model.fp16.safetensors',
               'vae/config.json', 'vae/diffusion_pytorch_model.bin',
               'text_encoder/config.json', 'text_encoder/model.safetensors.index.json',
               'text_encoder/model-00001-of-00002.safetensors', 'text_encoder/model-00002-of-00002.safetensors',
               'text_encoder/pytorch_model.bin']
    common = ['model_index.json', 'scheduler/scheduler_config.json', 'text_encoder/config.json',
              'text_encoder/model-00001-of-00002.safetensors', 'text_encoder/model-00002-of-00002.safetensors',
              'text_encoder/model.safetensors.index.json', 'tokenizer/merges.txt', 'tokenizer/vocab.json',
              'unet/config.json', 'vae/config.json', 'vae/diffusion_pytorch_model.bin']
    assert files_to_download(listing, half=False) == sorted(common + ['unet/diffusion_pytorch_model.safetensors'])
    assert files_to_download(listing, half=True) == sorted(common + ['unet/diffusion_pytorch_model.fp16.safetensors'])
    original = ['configuration.json', 'text2video_pytorch_model.pth', 'VQGAN_autoencoder.pth',
                'open_clip_pytorch_model.bin', 'README.md', 'samples/a.gif']
    assert files_to_download(original, half=True) == sorted(original[:5])
    assert files_to_download(['weights.pt'], half=False) is None


# -- conversion --------------------------------------------------------------------------------

def test_original_to_diffusers_to_original_is_exact(original, tmp_path):
    diffusers_dir = convert_lib.convert(original, str(tmp_path / 'd'), 'diffusers', safetensors=True)
    back = convert_lib.convert(diffusers_dir, str(tmp_path / 'o'), 'original')
    for a, b in zip(model_folder.read_state_dicts(open_folder(original)),
                    model_folder.read_state_dicts(open_folder(back))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open_folder(back).config == open_folder(original).config


def test_diffusers_to_original_to_diffusers_is_exact_and_loads_in_diffusers(pipe, saved, tmp_path):
    from diffusers import TextToVideoSDPipeline
    back = convert_lib.convert(convert_lib.convert(saved, str(tmp_path / 'o'), 'original'),
                               str(tmp_path / 'd'), 'diffusers')
    again = TextToVideoSDPipeline.from_pretrained(back)
    for name in ('unet', 'vae', 'text_encoder'):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(diffusers_latents(pipe, latents, steps=2), diffusers_latents(again, latents, steps=2))


def test_convert_casts_refuses_to_overwrite_and_leaves_nothing_on_failure(original, tmp_path, monkeypatch):
    half = convert_lib.convert(original, str(tmp_path / 'half'), 'original', dtype='float16', safetensors=True)
    assert all(v.dtype == torch.float16 for state in model_folder.read_state_dicts(open_folder(half))
               for v in state.values())
    with pytest.raises(ValueError, match='exists; converting never overwrites'):
        convert_lib.convert(original, half, 'diffusers')

    def fail(state, path):
        raise OSError('disk full')
    monkeypatch.setattr(convert_lib, 'save_state_dict', fail)
    with pytest.raises(OSError, match='disk full'):
        convert_lib.convert(original, str(tmp_path / 'broken'), 'diffusers')
    assert sorted(os.listdir(tmp_path)) == ['half']   # no half-written folder, no temporary one


def test_convert_command(original, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, '-m', 'modelscope_t2v', 'convert', *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    result = run(original, str(tmp_path / 'd'), '--to', 'diffusers')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / 'd')
    assert sorted(os.listdir(tmp_path / 'd')) == ['model_index.json', 'scheduler', 'text_encoder', 'tokenizer',
                                                   'unet', 'vae']
    result = run(original, str(tmp_path / 'd'), '--to', 'diffusers')
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'never overwrites' in result.stderr


def test_command_line_runs_a_diffusers_folder_and_a_partial_one(saved, original, tmp_path):
    partial = tmp_path / 'zs2'
    partial.mkdir()
    shutil.copy(os.path.join(original, CONFIG.ckpt_unet), partial / CONFIG.ckpt_unet)
    small = ['--num-frames', '2', '--height', '32', '--width', '32', '--steps', '1', '--device', 'cpu', '--seed', '1']
    for i, model in enumerate((['--model', saved], ['--model', str(partial), '--base-model', original])):
        out = tmp_path / f'{i}.mp4'
        result = subprocess.run([sys.executable, '-m', 'modelscope_t2v', PROMPT, '-o', str(out), *model, *small],
                                capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert result.returncode == 0, result.stderr
        info = probe_video(out)
        assert (info['frames'], info['width'], json.loads(info['comment'])['seed']) == (2, 32, 1)
