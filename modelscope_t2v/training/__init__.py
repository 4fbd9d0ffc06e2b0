"""Fine-tuning with PyTorch Lightning: LoRA (peft) or full, on folders of captioned videos (README, Training).

    from modelscope_t2v.training import TrainConfig, train
    result = train('my-run.yaml')          # or train(TrainConfig(model=..., output_dir=..., data_dir=...))

Imports Lightning and peft only where they are used: `modelscope_t2v.training.config` stands alone.
"""

from .config import TrainConfig, load as load_config

__all__ = ['TrainConfig', 'load_config', 'train', 'export_checkpoint']


def train(config):
    """See run.train."""
    from .run import train as run_train
    return run_train(config)


def export_checkpoint(config, checkpoint=None):
    """See run.export_checkpoint."""
    from .run import export_checkpoint as run_export
    return run_export(config, checkpoint)
