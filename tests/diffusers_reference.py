"""diffusers' own text-to-video pipelines at tiny sizes, with random weights: the references for the
diffusers layout (test_model_folders.py) and video-to-video (test_video_to_video.py)."""

import os
import tempfile

import torch
from reference import randomize_

from modelscope_t2v import convert, diffusers_format
from modelscope_t2v.config import TINY, replace
from modelscope_t2v.tokenizer import hf_tokenizer_files

# diffusers' UNet3DConditionModel gives its first temporal transformer 8 heads, whatever its config says
CONFIG = replace(TINY, unet=replace(TINY.unet, num_heads=8))


def diffusers_pipeline(config=CONFIG, seed=0):
    """diffusers' TextToVideoSDPipeline of `config`'s shapes with random weights, built from its own classes."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = randomize_(UNet3DConditionModel(**diffusers_format.unet_config_to_diffusers(config.unet)), seed, 0.05)
    vae = randomize_(AutoencoderKL(**diffusers_format.autoencoder_config_to_diffusers(config.autoencoder)), seed + 1)
    text = randomize_(CLIPTextModel(CLIPTextConfig(**diffusers_format.text_config_to_diffusers(config.text))), seed + 2)
    pipe = TextToVideoSDPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(),
                                 unet=unet.eval(), scheduler=DDIMScheduler.from_config(convert.scheduler_config(config)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_tokenizer():
    """transformers' CLIPTokenizer over OpenAI's BPE vocabulary (open_clip ships the same)."""
    from transformers import CLIPTokenizer
    folder = tempfile.mkdtemp()
    for name, text in hf_tokenizer_files().items():
        with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
            f.write(text)
    return CLIPTokenizer.from_pretrained(folder)
