"""The known members of the model family: per-model defaults and the files each hub id needs.

All keep the original UNet configuration; they differ in the size and frame count they
were fine-tuned at, and in their files' layout ('original': configuration.json and three
checkpoint files; 'diffusers': model_index.json and one folder per network).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class KnownModel:
    layout: str            # 'original' or 'diffusers'
    width: int             # default size in pixels
    height: int
    frames: int            # default frame count
    note: str              # what it is, for the README's table


KNOWN_MODELS = {
    'damo-vilab/modelscope-damo-text-to-video-synthesis': KnownModel(
        'original', 256, 256, 16, 'the original release (watermarked)'),
    'ali-vilab/text-to-video-ms-1.7b': KnownModel(
        'diffusers', 256, 256, 16, 'the original in diffusers layout, with fp16 files'),
    'damo-vilab/text-to-video-ms-1.7b': KnownModel(
        'diffusers', 256, 256, 16, 'the same, under its former id'),
    'cerspense/zeroscope_v2_576w': KnownModel('diffusers', 576, 320, 24, 'no watermark, 16:9'),
    'cerspense/zeroscope_v2_XL': KnownModel('diffusers', 1024, 576, 24, 're-renders 576w videos'),
    'cerspense/zeroscope_v2_30x448x256': KnownModel('diffusers', 448, 256, 30, 'no watermark'),
    'camenduru/potat1': KnownModel('diffusers', 1024, 576, 16, 'its own text encoder; frames: the base\'s'),
    'strangeman3107/animov-0.1.1': KnownModel('diffusers', 448, 384, 16, 'anime; frames: the base\'s'),
    'strangeman3107/animov-512x': KnownModel('diffusers', 512, 512, 16, 'anime; frames: the base\'s'),
}


def known_model_of(path: str) -> Optional[Tuple[str, KnownModel]]:
    """(hub id, KnownModel) of a folder that is a hub cache's copy of a known model, else None.

    Hugging Face caches a repo as `.../models--OWNER--NAME/snapshots/REV`, ModelScope as
    `.../OWNER/NAME`; a subfolder of either (zeroscope's zs2_576w/) belongs to it too.
    """
    path = os.path.abspath(path).replace(os.sep, '/')
    for hub_id, model in KNOWN_MODELS.items():
        owner, name = hub_id.split('/')
        hf_cache = f'/models--{owner}--{name}/snapshots/'
        if hf_cache in path or re.search(f'/{re.escape(hub_id)}(/|$)', path):
            return hub_id, model
    return None
