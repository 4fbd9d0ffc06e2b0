"""train(config): a Lightning Trainer over TextToVideoTraining and ClipDataModule, then the exports.

    modelscope-t2v train CONFIG.yaml                      train (resume with resume_from), export at the end
    modelscope-t2v train CONFIG.yaml --export-only [CKPT] export a checkpoint (default: the last) now
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch

from .. import model_folder
from ..hub import resolve_model_dir
from . import config as config_lib
from .config import TrainConfig

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = 'last.ckpt'


@dataclass
class TrainResult:
    global_step: int
    exports: List[str]                                   # folders written (rank zero; none on other ranks)
    losses: List[Tuple[int, float]] = field(default_factory=list)   # (global step, loss) of rank zero's batches
    checkpoint_dir: str = ''
    module: object = None                                # the TextToVideoTraining, for inspection


def as_config(config: Union[TrainConfig, dict, str, os.PathLike]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return config_lib.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return config_lib.load(os.fspath(config))
    raise TypeError(f'config must be a TrainConfig, a dict or a YAML path, not {type(config).__name__}')


def check_packages(config: TrainConfig) -> None:
    """ValueError naming the package that an option needs and this environment lacks."""
    needs = []
    if config.optimizer == 'adamw8bit':
        needs.append(('bitsandbytes', "optimizer='adamw8bit'"))
    if config.logger == 'tensorboard' and not importlib.util.find_spec('tensorboardX'):
        needs.append(('tensorboard', "logger='tensorboard'"))
    for package, option in needs:
        if importlib.util.find_spec(package) is None:
            raise ValueError(f'{option} needs the package {package}, which is not installed: pip install {package}')


def resume_path(config: TrainConfig) -> Optional[str]:
    """The checkpoint resume_from names ('last': the run's last checkpoint), checked to exist."""
    if config.resume_from is None:
        return None
    path = os.path.join(config.checkpoint_dir, LAST_CHECKPOINT) if config.resume_from == 'last' else config.resume_from
    if not os.path.isfile(path):
        raise ValueError(f'resume_from={config.resume_from!r}: no checkpoint at {path}')
    return path


def open_model(config: TrainConfig) -> model_folder.ModelFolder:
    base = resolve_model_dir(config.base_model) if config.base_model else None
    return model_folder.open_folder(resolve_model_dir(config.model), base)


def build_module(config: TrainConfig, folder: model_folder.ModelFolder):
    """The LightningModule over the folder's networks (float32 on the CPU; Lightning moves and casts them)."""
    from .module import TextToVideoTraining
    return TextToVideoTraining(config, folder.config, model_folder.load_networks(folder))


def build_trainer(config: TrainConfig, extra_callbacks=()):
    """Lightning's Trainer: checkpoints every checkpoint_every_n_steps (and last.ckpt), the logger, validation
    videos, `extra_callbacks`; the batch sampler splits batches over the ranks itself
    (use_distributed_sampler=False)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from .callbacks import ValidationVideos
    callbacks = [ModelCheckpoint(dirpath=config.checkpoint_dir, filename='step-{step:06d}',
                                 auto_insert_metric_name=False, every_n_train_steps=config.checkpoint_every_n_steps,
                                 save_top_k=-1, save_last=True)]
    if config.validation_every_n_steps is not None:
        callbacks.append(ValidationVideos(config))
    callbacks += list(extra_callbacks)
    logger_class = TensorBoardLogger if config.logger == 'tensorboard' else CSVLogger
    return pl.Trainer(
        max_steps=config.max_steps, max_epochs=config.max_epochs if config.max_epochs is not None else -1,
        accelerator=config.accelerator,
        devices=list(config.devices) if isinstance(config.devices, tuple) else config.devices,
        strategy=config.strategy, num_nodes=config.num_nodes, precision=config.precision,
        accumulate_grad_batches=config.accumulate_grad_batches, gradient_clip_val=config.gradient_clip_val,
        log_every_n_steps=config.log_every_n_steps, enable_progress_bar=config.progress_bar,
        logger=logger_class(config.output_dir, name='logs'), callbacks=callbacks, use_distributed_sampler=False,
        default_root_dir=config.output_dir, num_sanity_val_steps=0, enable_model_summary=False)


def train(config: Union[TrainConfig, dict, str, os.PathLike]) -> TrainResult:
    """Train as `config` says (a TrainConfig, a dict of its keys or a YAML file), then export on rank zero."""
    # 1. the configuration, the packages it needs, the checkpoint to resume: all before any weight is read
    config = as_config(config)
    check_packages(config)
    resume = resume_path(config)
    folder = open_model(config)
    os.makedirs(config.output_dir, exist_ok=True)

    # 2. the networks with what is trained, the data, the trainer
    import pytorch_lightning as pl

    from .export import export, export_folder
    from .module import ClipDataModule
    pl.seed_everything(config.seed, workers=True, verbose=False)   # peft's initial lora_A, the workers
    module = build_module(config, folder)
    datamodule = ClipDataModule(config, folder.config, autoencoder_id(folder))
    trainer = build_trainer(config)

    # 3. fit; Lightning restores the trained tensors, optimizer, schedule and loops from `resume`
    with warnings.catch_warnings():   # the frozen autoencoder is in eval mode on purpose: Lightning warns of it
        warnings.filterwarnings('ignore', message=r'Found \d+ module\(s\) in eval mode')
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)

    # 4. export on rank zero
    exports = []
    if trainer.is_global_zero:
        exports.append(export(module, folder, export_folder(config.output_dir, trainer.global_step)))
    return TrainResult(trainer.global_step, exports, list(module.losses()), config.checkpoint_dir, module)


def autoencoder_id(folder: model_folder.ModelFolder) -> str:
    """What names the autoencoder in latent-cache keys: its files' paths, sizes and mtimes."""
    files = folder.weights[2]
    return json.dumps([(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files])


def export_checkpoint(config: Union[TrainConfig, dict, str, os.PathLike], checkpoint: Optional[str] = None) -> str:
    """Export the trained tensors of a Lightning checkpoint of this run (default: its last) now; returns the
    export folder, named by the checkpoint's global step."""
    config = as_config(config)
    path = checkpoint or os.path.join(config.checkpoint_dir, LAST_CHECKPOINT)
    if not os.path.isfile(path):
        raise ValueError(f'no checkpoint at {path}')
    folder = open_model(config)
    module = build_module(config, folder)
    state = torch.load(path, map_location='cpu', weights_only=True)
    module.on_load_checkpoint(state)
    module.load_state_dict(state['state_dict'], strict=False)
    from .export import export, export_folder
    return export(module, folder, export_folder(config.output_dir, state['global_step']))


def main(argv=None) -> int:
    """`modelscope-t2v train`: the command line of train and export_checkpoint."""
    parser = argparse.ArgumentParser(prog='modelscope-t2v train', description='Fine-tune the model (LoRA or full) '
                                     'with PyTorch Lightning; every key of CONFIG is in docs/train-example.yaml.')
    parser.add_argument('config', help='the YAML training configuration')
    parser.add_argument('--export-only', nargs='?', const='', default=None, metavar='CKPT',
                        help="export a checkpoint (default: OUTPUT_DIR/checkpoints/last.ckpt) and stop")
    parser.add_argument('--verbose', action='store_true', help='log progress details')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(message)s')
    if args.export_only is not None:
        print(export_checkpoint(args.config, args.export_only or None))
        return 0
    result = train(args.config)
    for path in result.exports:
        print(path)
    return 0
