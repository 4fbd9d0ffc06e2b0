"""Find a model dir: a local folder, or a hub id downloaded once into the hub's usual cache.

The only module that talks to a model hub (Hugging Face Hub or ModelScope Hub).
"""

from __future__ import annotations

import logging
import os

from .model_folder import files_to_download, is_model_folder

logger = logging.getLogger(__name__)

# The original weights in their original file format (the model card's download).
DEFAULT_MODEL = 'damo-vilab/modelscope-damo-text-to-video-synthesis'
HUBS = ('huggingface', 'modelscope')


class ModelNotFound(FileNotFoundError):
    """Neither a local model dir nor a hub id that could be downloaded."""


def resolve_model_dir(model: str = DEFAULT_MODEL, hub: str = 'huggingface', half: bool = False) -> str:
    """A local model dir for `model`: itself if it is a folder, else the hub's cached download (only the
    files loading needs; the fp16 variant of a diffusers folder when `half` and it has one)."""
    if os.path.isdir(model):
        if not is_model_folder(model):
            raise ModelNotFound(f'{model} is a folder without a model: it holds neither configuration.json '
                                'and the original checkpoint files nor model_index.json (diffusers layout)')
        return model
    if hub not in HUBS:
        raise ValueError(f'hub={hub!r} is not one of {HUBS}')
    if not _looks_like_hub_id(model):
        raise ModelNotFound(f'model={model!r} is neither an existing folder nor a hub id like {DEFAULT_MODEL!r}')
    try:
        return _download(model, hub, half)
    except Exception as error:  # the hub clients raise many types for "offline" and "not found"
        raise ModelNotFound(
            f'could not get {model!r} from the {hub} hub ({type(error).__name__}: {_first_line(error)}). '
            'Without network, pass a local model dir holding configuration.json, '
            'text2video_pytorch_model.pth, VQGAN_autoencoder.pth and open_clip_pytorch_model.bin, '
            'e.g. --model ./weights') from error


def _download(repo_id: str, hub: str, half: bool) -> str:
    """The cached snapshot if there is one, else a download with the hub's progress bars."""
    if hub == 'modelscope':
        from modelscope.hub.snapshot_download import snapshot_download as modelscope_download
        return modelscope_download(repo_id)
    from huggingface_hub import HfApi, snapshot_download
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        wanted = files_to_download(HfApi().list_repo_files(repo_id), half)
        logger.info('downloading %s from the Hugging Face Hub (once; then cached): %s', repo_id,
                    'all files' if wanted is None else ', '.join(wanted))
        return snapshot_download(repo_id, allow_patterns=wanted)


def _looks_like_hub_id(model: str) -> bool:
    """'owner/name': one slash, not a path that starts at '/', '.' or '~'."""
    owner, _, name = model.partition('/')
    return bool(owner and name) and '/' not in name and not model.startswith(('.', '~'))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [''])[0][:200]


# the files a LoRA repo's folder may hold, in any of the formats of lora/formats.py
LORA_PATTERNS = ('*.safetensors', '*.pt', '*.bin', '*.json')


def resolve_lora(lora: str) -> str:
    """A local file or folder for `lora`: itself if it exists, else a Hugging Face hub id 'owner/name', or
    'owner/name/subfolder' for one of a repo's folders (MCM's 'yhzhai/mcm/modelscopet2v-laion'), downloaded once."""
    lora = os.fspath(lora)
    if os.path.exists(lora):
        return lora
    parts = lora.split('/')
    repo_id, sub = '/'.join(parts[:2]), '/'.join(parts[2:])
    if not _looks_like_hub_id(repo_id):
        raise ModelNotFound(f'lora={lora!r} is neither an existing file or folder nor a hub id like '
                            "'owner/name' or 'owner/name/subfolder'")
    patterns = [f'{sub}/{p}' for p in LORA_PATTERNS] if sub else list(LORA_PATTERNS)
    from huggingface_hub import snapshot_download
    try:
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            logger.info('downloading the LoRA %s from the Hugging Face Hub (once; then cached)', lora)
            folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as error:  # offline, not found, gated
        raise ModelNotFound(f'could not get the LoRA {lora!r} from the Hugging Face hub ({type(error).__name__}: '
                            f'{_first_line(error)}). Without network, pass a local LoRA file or folder') from error
    path = os.path.join(folder, sub) if sub else folder
    if not os.path.exists(path):
        raise ModelNotFound(f'the hub repo {repo_id!r} has no folder {sub!r} with LoRA files')
    return path
