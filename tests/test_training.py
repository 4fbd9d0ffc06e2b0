"""Training (modelscope_t2v.training) on the tiny random model, on the CPU: the loss falls, exports read back, the
LoRA changes the video, resuming is exact, latent caching, 2-process DDP, a full fine-tune, configuration errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from modelscope_t2v import TextToVideo, model_folder, parse_request, video_io
from modelscope_t2v.config import TINY
from modelscope_t2v.lora import read_lora
from modelscope_t2v.training import TrainConfig, export_checkpoint, train
from modelscope_t2v.training import config as config_lib
from modelscope_t2v.training import data, run
from modelscope_t2v.training.export import PEFT_FOLDER, STABLE_LORA_FILE, run_lora_weights
from modelscope_t2v.training.targets import base_state_dict, merged_state_dict

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py
CAPTION = 'a green square moving down'
LORA_STEPS = 30
LEARNING_RATE = 1e-2


def square_clip(frames=4, height=32, width=32, shade=255) -> np.ndarray:
    """uint8 (f, h, w, 3): a red ramp and a green square moving down a row pair per frame."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, None, :]
    for i in range(frames):
        video[i, 8 + 2 * i:16 + 2 * i, 8:16, 1] = shade
    return video


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('clips')
    video_io.write_video(square_clip(), folder / 'square.mp4', fps=8)
    (folder / 'square.txt').write_text(CAPTION)
    return str(folder)


def tiny_config(model, output_dir, data_dir, **changes) -> TrainConfig:
    values = dict(model=model, output_dir=str(output_dir), data_dir=data_dir, width=32, height=32, n_sample_frames=4,
                  lora_rank=4, learning_rate=LEARNING_RATE, max_steps=LORA_STEPS, accelerator='cpu', devices=1,
                  progress_bar=False, checkpoint_every_n_steps=LORA_STEPS, log_every_n_steps=1)
    return TrainConfig(**{**values, **changes})


def fixed_loss(module, batch, draws=32) -> float:
    """The loss of one batch averaged over fixed draws (timesteps, noise): comparable across weights."""
    with torch.no_grad():
        return float(torch.stack([module.loss(batch, torch.Generator().manual_seed(k)) for k in range(draws)]).mean())


def one_batch(config: TrainConfig, cache_dir=None) -> dict:
    dataset = data.ClipDataset(data.find_clips(config), cache_dir)
    return data.collate([dataset[0]], TINY.text.context_length)


@pytest.fixture(scope='module')
def lora_run(tiny_model_dir, data_dir, tmp_path_factory):
    config = tiny_config(tiny_model_dir, tmp_path_factory.mktemp('lora-run'), data_dir)
    return config, train(config)


def test_lora_lowers_the_loss(lora_run):
    """30 steps of a rank-4 LoRA on the spatial and temporal attentions, lr 1e-2: the loss over 32 fixed draws
    falls from 1.240 (the base: lora_B starts at zero) to 0.981 (measured; asserted: by at least 15 %)."""
    config, result = lora_run
    assert result.global_step == LORA_STEPS and [s for s, _ in result.losses] == list(range(LORA_STEPS))
    base = run.build_module(config, run.open_model(config))   # fresh adapters: the base model's loss
    batch = one_batch(config)
    before, after = fixed_loss(base, batch), fixed_loss(result.module, batch)
    print(f'fixed-draw loss: base {before:.4f}, after {LORA_STEPS} steps {after:.4f}')
    assert after < 0.85 * before, (before, after)


def test_lora_exports_read_back_equal(lora_run):
    """stable_lora and PEFT files give back every pair: equal tensors key for key (alpha = rank: scale 1)."""
    config, result = lora_run
    weights = run_lora_weights(result.module)
    assert len(weights) == 120 and all(name.startswith("unet.") for name in weights)   # 15 transformers x 2 x 4
    folder = result.exports[0]
    assert folder.endswith(f'exports/step-{LORA_STEPS:06d}')
    for read in (read_lora(os.path.join(folder, STABLE_LORA_FILE), TINY),
                 read_lora(os.path.join(folder, PEFT_FOLDER), TINY)):
        assert sorted(read) == sorted(weights)
        for name, pair in weights.items():
            assert torch.equal(read[name].down, pair.down), name
            assert torch.equal(read[name].up * read[name].scale, pair.up * pair.scale), name
    assert max(float(p.up.abs().max()) for p in weights.values()) > 1e-3   # trained: lora_B left zero


def test_lora_changes_the_generation(lora_run, tiny_model_dir):
    """The UNet with the LoRA merged into its weights equals the peft-wrapped UNet (float32, 1e-5). The engine with
    the exported stable_lora file loaded (engine.load_lora) makes the merged UNet's video (within one uint8 level),
    another than the base's from the same seed; so does the PEFT export."""
    config, result = lora_run
    weights = run_lora_weights(result.module)
    unet = result.module.unet.eval()
    folder = model_folder.open_folder(tiny_model_dir)
    text, base_unet, vae = model_folder.load_networks(folder)
    base_unet.load_state_dict(merged_state_dict(base_state_dict(unet), weights, 'unet.'))
    x, t = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_eps, merged_eps = unet(x, t, context), base_unet(x, t, context)
    assert torch.allclose(peft_eps, merged_eps, atol=1e-5), float((peft_eps - merged_eps).abs().max())
    request = parse_request({'text': CAPTION, 'seed': 5}, folder.config, num_frames=4, height=32, width=32,
                            num_inference_steps=5, output_type='frames')
    merged = TextToVideo.from_networks(folder.config, (text, base_unet, vae), device='cpu')(request).frames[0]
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    base = engine(request).frames[0].astype(int)
    engine.load_lora(os.path.join(result.exports[0], STABLE_LORA_FILE))
    loaded = engine(request).frames[0].astype(int)
    assert np.abs(loaded - merged.astype(int)).max() <= 1
    engine.unload_lora()
    engine.load_lora(os.path.join(result.exports[0], PEFT_FOLDER))   # the PEFT export: the same video
    assert np.abs(engine(request).frames[0].astype(int) - loaded).max() <= 1
    change = np.abs(loaded - base).mean()
    print(f'mean |LoRA - base| over the frames: {change:.2f} of 255')
    assert change > 1.0


def test_resume_continues_at_the_same_step_and_loss(tiny_model_dir, data_dir, tmp_path):
    """6 steps in one run against 3 steps, then a resume from step 3's checkpoint: steps 3..5 have the same losses
    (exactly: every draw is seeded by the step). The first run also writes a validation video at steps 3 and 6."""
    whole = train(tiny_config(tiny_model_dir, tmp_path / 'whole', data_dir, max_steps=6, checkpoint_every_n_steps=3,
                              validation_every_n_steps=3, validation_prompts=(CAPTION,), validation_inference_steps=2))
    checkpoint = os.path.join(whole.checkpoint_dir, 'step-000003.ckpt')
    assert torch.load(checkpoint, weights_only=True)['global_step'] == 3
    resumed = train(tiny_config(tiny_model_dir, tmp_path / 'resumed', data_dir, max_steps=6, checkpoint_every_n_steps=3,
                                resume_from=checkpoint))
    assert resumed.global_step == 6
    assert [s for s, _ in resumed.losses] == [3, 4, 5]
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in whole.losses[3:]], (whole.losses,
                                                                                          resumed.losses)
    for step in (3, 6):
        info = video_io.probe_video(tmp_path / 'whole' / 'validation' / f'step-{step:06d}-0.mp4')
        assert (info['frames'], info['width'], info['height']) == (4, 32, 32)
    # exporting the last checkpoint on demand gives the export of the run's end
    again = export_checkpoint(tiny_config(tiny_model_dir, tmp_path / 'whole', data_dir))
    assert again == whole.exports[0]
    assert read_lora(os.path.join(again, STABLE_LORA_FILE), TINY).keys() == run_lora_weights(whole.module).keys()


def test_latent_cache_gives_the_loss_of_the_frames(lora_run, tmp_path):
    """Cached posterior moments give the loss that encoding the frames gives (float32, 1e-6); the file is written
    once."""
    config, result = lora_run
    dataset = data.ClipDataset(data.find_clips(config), str(tmp_path / 'cache'))
    assert dataset.fill_cache(result.module.encode_moments, range(len(dataset))) == 1
    assert dataset.fill_cache(result.module.encode_moments, range(len(dataset))) == 0
    cached = data.collate([dataset[0]], TINY.text.context_length)
    assert cached['moments'].shape == (1, 8, 4, 4, 4)
    g = lambda: torch.Generator().manual_seed(7)   # noqa: E731
    with torch.no_grad():
        assert abs(float(result.module.loss(cached, g())) - float(result.module.loss(one_batch(config), g()))) < 1e-6


def test_full_fine_tune_exports_an_original_folder(tiny_model_dir, data_dir, tmp_path):
    """target: full, 2 steps with EMA: an original-format folder that loads, with a changed UNet and the source's
    autoencoder and text files copied byte for byte."""
    result = train(tiny_config(tiny_model_dir, tmp_path, data_dir, target='full', max_steps=2, learning_rate=1e-4,
                               ema_decay=0.5))
    out = result.exports[0]
    for name in ('VQGAN_autoencoder.pth', 'open_clip_pytorch_model.bin'):
        with open(os.path.join(out, name), 'rb') as a, open(os.path.join(tiny_model_dir, name), 'rb') as b:
            assert a.read() == b.read(), name
    trained = model_folder.load_networks(model_folder.open_folder(out))[1].state_dict()
    base = model_folder.load_networks(model_folder.open_folder(tiny_model_dir))[1].state_dict()
    assert trained.keys() == base.keys()
    changed = sum(not torch.equal(trained[k], base[k]) for k in base)
    assert changed > 0.9 * len(base), (changed, len(base))
    ema = result.module.ema.averaged()
    assert torch.equal(trained['out.2.weight'], ema['unet.out.2.weight'])


def test_options_together(tiny_model_dir, data_dir, tmp_path):
    """LoRA on the feed-forwards and the text encoder too, gradient checkpointing, bf16 autocast, offset noise,
    cached latents, EMA, warm-up: 2 steps run, the cache holds the clip, and both networks' LoRAs are exported."""
    result = train(tiny_config(tiny_model_dir, tmp_path, data_dir, max_steps=2, train_text_encoder=True,
                               lora_modules=('spatial_attention', 'temporal_attention', 'ff'), lora_alpha=8.0,
                               gradient_checkpointing=True, precision='bf16-mixed', offset_noise_strength=0.1,
                               cache_latents=True, ema_decay=0.9, lr_warmup_steps=1))
    assert result.global_step == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert len(os.listdir(tmp_path / 'latent-cache')) == 1
    weights = read_lora(os.path.join(result.exports[0], PEFT_FOLDER), TINY)
    text = [n for n in weights if n.startswith('text.')]
    assert len(weights) == 150 + len(text) and len(text) == 3 * TINY.text.used_layers
    assert all(p.alpha == 8.0 for p in weights.values())
    trained = (text[0], 'unet.middle_block.1.transformer_blocks.0.ff.net.2')
    assert all(float(weights[n].up.abs().max()) > 0 for n in trained)


def test_ddp_two_processes_on_the_cpu(tiny_model_dir, data_dir, tmp_path):
    """`modelscope-t2v train` with strategy ddp, 2 CPU processes (gloo), two clips: one epoch is one step of a
    batch per rank; rank zero exports."""
    folder = tmp_path / 'two'
    folder.mkdir()
    for i in range(2):
        video_io.write_video(square_clip(shade=128 + 127 * i), folder / f'clip{i}.mp4', fps=8)
        (folder / f'clip{i}.txt').write_text(f'{CAPTION} {i}')
    config = config_lib.to_dict(tiny_config(tiny_model_dir, tmp_path / 'out', str(folder), strategy='ddp', devices=2,
                                            max_epochs=1, max_steps=100))
    path = tmp_path / 'ddp.yaml'
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, '-m', 'modelscope_t2v', 'train', str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = torch.load(tmp_path / 'out' / 'checkpoints' / 'last.ckpt', weights_only=True)
    assert (last['global_step'], last['epoch']) == (1, 1)   # one step (2 clips, a batch of 1 per rank): one epoch done
    export = tmp_path / 'out' / 'exports' / 'step-000001'
    assert done.stdout.split() == [str(export)]
    assert len(read_lora(export / STABLE_LORA_FILE, TINY)) == 120


def test_fsdp_clips_through_fsdp_and_other_strategies_through_lightning(lora_run, monkeypatch):
    """Lightning's FSDP precision refuses to clip by norm (the H200 run of bench/train_memory.py --strategy fsdp
    stopped there); the module hands the norm to the FSDP-wrapped model's clip_grad_norm_ instead."""
    import pytorch_lightning as pl
    module = run.build_module(lora_run[0], run.open_model(lora_run[0]))
    clipped = []
    wrapped = type('FSDPWrapped', (), {'clip_grad_norm_': lambda self, norm: clipped.append(norm)})()
    fsdp = pl.strategies.FSDPStrategy()
    monkeypatch.setattr(pl.strategies.FSDPStrategy, 'model', property(lambda self: wrapped))
    monkeypatch.setattr(module, '_trainer', type('Trainer', (), {'strategy': fsdp})())
    module.configure_gradient_clipping(None, 0.5, 'norm')
    assert clipped == [0.5]
    lightning = []
    monkeypatch.setattr(pl.LightningModule, 'clip_gradients', lambda self, *args, **kw: lightning.append(args))
    monkeypatch.setattr(module, '_trainer', type('Trainer', (), {'strategy': pl.strategies.DDPStrategy()})())
    module.configure_gradient_clipping('optimizer', 0.5, 'norm')
    assert (clipped, lightning) == ([0.5], [('optimizer',)])


# -- data --------------------------------------------------------------------------------------

def test_json_dataset_buckets_and_batches(tmp_path):
    """The JSON form's entries start at their frame_index; clips go to the bucket nearest their aspect ratio, and
    every batch holds one bucket; two ranks get equally many batches."""
    video_io.write_video(square_clip(frames=8, width=64), tmp_path / 'wide.mp4', fps=8)
    video_io.write_video(square_clip(frames=8), tmp_path / 'square.mp4', fps=8)
    (tmp_path / 'data.json').write_text(
        '{"name": "t", "data": [{"video_path": "wide.mp4", "data": [{"frame_index": 0, "prompt": "a"}, '
        '{"frame_index": 4, "prompt": "b"}]}, '
        '{"video_path": "square.mp4", "data": [{"frame_index": 2, "prompt": "c"}]}]}')
    config = TrainConfig(model='m', output_dir='o', json=str(tmp_path / 'data.json'), n_sample_frames=4,
                         buckets=((64, 32), (32, 32)), batch_size=2)
    clips = data.find_clips(config)
    assert [(c.prompt, c.start, c.size) for c in clips] == [('a', 0, (64, 32)), ('b', 4, (64, 32)), ('c', 2, (32, 32))]
    pixels = data.clip_pixels(clips[1])
    assert pixels.shape == (3, 4, 32, 64) and -1 <= float(pixels.min()) and float(pixels.max()) <= 1
    sampler = data.BucketBatchSampler([c.size for c in clips], 2, seed=0)
    assert sorted(map(sorted, sampler)) == [[0, 1], [2]]
    ranks = [list(data.BucketBatchSampler([c.size for c in clips], 2, 0, rank, 2)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1 and sorted(map(sorted, ranks[0] + ranks[1])) == [[0, 1], [2]]
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader
    _set_sampler_epoch(DataLoader(list(range(3)), batch_sampler=sampler), 3)   # as Lightning's fit loop does
    assert sampler.epoch == 3
    auto = data.bucket_sizes(TrainConfig(model='m', output_dir='o', video='v', prompt='p', buckets='auto'))
    assert (256, 256) in auto and (320, 192) in auto and data.nearest_bucket(1280, 720, auto) == (320, 192)


def test_folder_clips_are_whole_windows_at_the_fps(tmp_path):
    """A 10-frame video at 8 fps sampled at fps 4 (stride 2): windows of 4 frames span 7, so one clip from frame 0;
    at stride 1 two (frames 0..3, 4..7). A video without a caption takes fallback_prompt."""
    video_io.write_video(square_clip(frames=10), tmp_path / 'a.mp4', fps=8)
    config = TrainConfig(model='m', output_dir='o', data_dir=str(tmp_path), n_sample_frames=4, fps=4.0,
                         fallback_prompt='fallback')
    assert [(c.start, c.stride, c.prompt) for c in data.find_clips(config)] == [(0, 2, 'fallback')]
    one = TrainConfig(model='m', output_dir='o', data_dir=str(tmp_path), n_sample_frames=4, fallback_prompt='x')
    assert [(c.start, c.stride) for c in data.find_clips(one)] == [(0, 1), (4, 1)]
    with pytest.raises(ValueError, match=r'a.mp4 has no caption .*a.txt; write one, or set fallback_prompt'):
        data.find_clips(TrainConfig(model='m', output_dir='o', data_dir=str(tmp_path)))


def test_cover_crop_keeps_the_aspect_ratio():
    """A 2:1 frame to 32x32 is scaled to 64x32 then centre-cropped: its middle half."""
    pixels = torch.linspace(-1, 1, 64).expand(1, 3, 32, 64).contiguous()
    out = data.cover_crop(pixels, 32, 32)
    assert out.shape == (1, 3, 32, 32) and torch.equal(out, pixels[..., 16:48])


# -- configuration errors --------------------------------------------------------------------

@pytest.mark.parametrize('changes, error, message', [
    ({'lora_rnak': 4}, ValueError, "unknown key 'lora_rnak'; did you mean 'lora_rank'?"),
    ({'model': None}, TypeError, "model=None must be a non-empty string"),
    ({'target': 'dora'}, ValueError, "target='dora' is not one of ['lora', 'full']"),
    ({'lora_rank': 0}, ValueError, 'lora_rank=0 must be at least 1'),
    ({'learning_rate': 'fast'}, TypeError, "learning_rate='fast' must be a finite number"),
    ({'lora_modules': ['attn']}, ValueError, "'attn' is not one of ['spatial_attention'"),
    ({'data_dir': None}, ValueError, 'no training data'),
    ({'data_dir': None, 'video': 'a.mp4'}, ValueError, "video='a.mp4' needs prompt"),
    ({'exports': ['original']}, ValueError, "'original' does not apply to target='lora'"),
    ({'width': 30}, ValueError, 'width=30 must be a multiple of 8'),
    ({'validation_every_n_steps': 10}, ValueError, 'validation_every_n_steps=10 needs validation_prompts'),
    ({'precision': 'fp16'}, ValueError, "precision='fp16' is not one of"),
    ({'validation_sampler': 'plms'}, ValueError, "validation_sampler='plms' is not one of"),
    ({'buckets': [[32]]}, ValueError, "buckets=((32,),) must be null, 'auto' or a list of [width, height]"),
])
def test_config_errors_name_the_key(tmp_path, changes, error, message):
    raw = {'model': 'weights', 'output_dir': 'out', 'data_dir': 'clips', **changes}
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(error) as caught:
        config_lib.load(str(path))
    assert str(caught.value).startswith(f'{path}: ') and message in str(caught.value), str(caught.value)


def test_config_reads_yaml_numbers_and_lists(tmp_path):
    path = tmp_path / 'run.yaml'
    path.write_text('model: w\noutput_dir: o\nvideo: v.mp4\nprompt: p\nlearning_rate: 1e-4\n'
                    'lora_modules: [ff]\nbuckets: [[64, 32]]\ndevices: [0, 1]\n')
    config = config_lib.load(str(path))
    assert (config.learning_rate, config.lora_modules, config.buckets, config.devices) == (
        1e-4, ('ff',), ((64, 32),), (0, 1))
    assert config_lib.from_dict(config_lib.to_dict(config)) == config


def test_example_config_lists_every_key_at_its_default():
    """docs/train-example.yaml holds every key once, each at its default but the three it must set."""
    path = os.path.join(os.path.dirname(__file__), '..', 'docs', 'train-example.yaml')
    with open(path, encoding='utf-8') as f:
        raw = yaml.safe_load(f)
    example = config_lib.to_dict(config_lib.load(path))
    defaults = config_lib.to_dict(TrainConfig(model='m', output_dir='o', data_dir='d'))
    assert set(raw) == set(defaults)
    assert {k for k in defaults if example[k] != defaults[k]} == {'model', 'output_dir', 'data_dir'}


def test_missing_optional_packages_are_named_before_loading(tmp_path):
    if run.importlib.util.find_spec('bitsandbytes') is None:
        with pytest.raises(ValueError, match=r"optimizer='adamw8bit' needs the package bitsandbytes"):
            train(TrainConfig(model=str(tmp_path / 'absent'), output_dir=str(tmp_path), video='v', prompt='p',
                              optimizer='adamw8bit'))
    if not any(run.importlib.util.find_spec(p) for p in ('tensorboard', 'tensorboardX')):
        with pytest.raises(ValueError, match=r"logger='tensorboard' needs the package tensorboard"):
            train(TrainConfig(model=str(tmp_path / 'absent'), output_dir=str(tmp_path), video='v', prompt='p',
                              logger='tensorboard'))
    with pytest.raises(ValueError, match=r"resume_from='last': no checkpoint at"):
        train(TrainConfig(model=str(tmp_path / 'absent'), output_dir=str(tmp_path), video='v', prompt='p',
                          resume_from='last'))


def test_cli_train_reports_a_bad_configuration(tmp_path, capsys):
    from modelscope_t2v import cli
    path = tmp_path / 'run.yaml'
    path.write_text('model: w\noutput_dir: o\n')
    assert cli.main(['train', str(path)]) == 2
    assert capsys.readouterr().err.startswith(f'modelscope-t2v: error: {path}: no training data')
