"""GPU benchmark of LoRA training: peak memory and steps/s of the real-size model.

    python bench/train_memory.py [--steps 20] [--rank 16] [--size 256] [--frames 16] [--precision bf16-mixed]
                                 [--no-checkpointing] [--cache-latents] [--target lora|full]
                                 [--optimizer adamw|adamw8bit] [--strategy auto|fsdp|ddp] [--devices N]
                                 [--model-dir DIR]
    python bench/train_memory.py --tiny          # the tiny model on the CPU: proves the script runs

Builds (once, in --model-dir) a random-weight model of the real shapes (random weights do the same arithmetic), one
synthetic clip of --frames frames of --size x --size, then trains a LoRA of --rank on the UNet's spatial and temporal
attentions, batch 1, with gradient checkpointing, through modelscope_t2v.training (Lightning). Prints the peak CUDA
memory (torch.cuda.max_memory_allocated: over the whole fit, and over the training steps alone) and the steps/s of
the steps after the first --warm-up. With --devices N (DDP or FSDP), rank 0 prints its own figures; clips_per_s is
the N ranks' throughput, one clip a step each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, '..')]

import pytorch_lightning as pl  # noqa: E402

from modelscope_t2v import video_io  # noqa: E402
from modelscope_t2v.config import FULL, TINY  # noqa: E402
from modelscope_t2v.tools.make_random_model import write_model_dir  # noqa: E402
from modelscope_t2v.training import TrainConfig  # noqa: E402
from modelscope_t2v.training import run  # noqa: E402
from modelscope_t2v.training.module import ClipDataModule  # noqa: E402


class StepClock(pl.Callback):
    """The wall time of each optimizer step (the GPU synchronised), and the peak memory of the steps alone."""

    def __init__(self):
        self.times, self.peak_steps = [], None

    def on_train_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.times.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            self.peak_steps = torch.cuda.max_memory_allocated() / 2 ** 30


def synthetic_clip(folder: str, frames: int, size: int) -> None:
    """A smooth random clip with a caption, as data_dir expects."""
    g = np.random.default_rng(0)
    small = g.random((frames, size // 16, size // 16, 3))
    video = (np.kron(small, np.ones((1, 16, 16, 1))) * 255).astype(np.uint8)
    video_io.write_video(video, os.path.join(folder, 'clip.mp4'), fps=8)
    with open(os.path.join(folder, 'clip.txt'), 'w', encoding='utf-8') as f:
        f.write('a random smooth texture')


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tiny', action='store_true', help='the tiny model at 32x32 x 4 frames, on the CPU')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warm-up', type=int, default=3, help='steps left out of steps/s')
    parser.add_argument('--rank', type=int, default=16)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--frames', type=int, default=16)
    parser.add_argument('--precision', default=None, help="Lightning's (default: bf16-mixed on CUDA, else 32-true)")
    parser.add_argument('--no-checkpointing', action='store_true', help='without gradient checkpointing')
    parser.add_argument('--cache-latents', action='store_true', help='encode the clip once, before the steps')
    parser.add_argument('--target', choices=('lora', 'full'), default='lora', help='full: every UNet weight')
    parser.add_argument('--optimizer', choices=('adamw', 'adamw8bit'), default='adamw')
    parser.add_argument('--strategy', default='auto', help="Lightning's: 'auto', 'fsdp', 'ddp', ...")
    parser.add_argument('--devices', type=int, default=1, help='GPUs, one process each (with --strategy ddp or fsdp)')
    parser.add_argument('--model-dir', default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.frames, args.steps, args.warm_up = 32, 4, max(3, min(args.steps, 5)), 1
        torch.set_num_threads(1)   # on busy shared cores OpenMP's spin-waits make tiny steps 30x slower
    cuda = torch.cuda.is_available() and not args.tiny
    work = tempfile.mkdtemp(prefix='train-memory-')
    size = 'tiny' if args.tiny else 'full'
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f'modelscope-t2v-bench-{size}')
    if not os.path.exists(os.path.join(model_dir, 'configuration.json')):
        start = time.perf_counter()
        write_model_dir(model_dir, TINY if args.tiny else FULL)
        print(f'wrote a random model to {model_dir} in {time.perf_counter() - start:.1f} s', flush=True)
    data_dir = os.path.join(work, 'data')
    os.makedirs(data_dir)
    synthetic_clip(data_dir, args.frames, args.size)

    config = TrainConfig(
        model=model_dir, output_dir=os.path.join(work, 'out'), data_dir=data_dir, width=args.size, height=args.size,
        n_sample_frames=args.frames, target=args.target, lora_rank=args.rank, optimizer=args.optimizer,
        strategy=args.strategy, max_steps=args.steps, batch_size=1,
        gradient_checkpointing=not args.no_checkpointing, cache_latents=args.cache_latents,
        precision=args.precision or ('bf16-mixed' if cuda else '32-true'), accelerator='gpu' if cuda else 'cpu',
        devices=args.devices, progress_bar=False, checkpoint_every_n_steps=10 ** 6, log_every_n_steps=10 ** 6)
    folder = run.open_model(config)
    pl.seed_everything(0, verbose=False)
    module = run.build_module(config, folder)
    clock = StepClock()
    trainer = run.build_trainer(config, [clock])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=ClipDataModule(config, folder.config, run.autoencoder_id(folder)))
    if trainer.global_rank != 0:
        return {}   # rank 0 reports its clock, loss and memory: every rank runs the same steps
    step_times = np.diff(clock.times)[args.warm_up:]
    result = {
        'device': torch.cuda.get_device_name() if cuda else 'cpu', 'torch': torch.__version__,
        'model': 'tiny' if args.tiny else 'full', 'size': args.size, 'frames': args.frames, 'target': args.target,
        'lora_rank': args.rank if args.target == 'lora' else None, 'optimizer': args.optimizer,
        'strategy': args.strategy, 'devices': args.devices,
        'precision': config.precision, 'gradient_checkpointing': config.gradient_checkpointing,
        'cache_latents': args.cache_latents, 'steps_timed': len(step_times),
        'steps_per_s': float(1 / step_times.mean()), 'clips_per_s': float(args.devices / step_times.mean()),
        'loss_last': module.losses()[-1][1],
        'peak_allocated_gib': torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        'peak_allocated_steps_gib': clock.peak_steps if cuda else None,
        'trained_parameters': sum(p.numel() for p in module.trained_tensors().values()),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == '__main__':
    main()
