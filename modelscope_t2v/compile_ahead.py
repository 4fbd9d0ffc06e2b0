"""A cold compile cache's builds started before the weights are read.

Without an earlier engine's artefacts (compile_cache.py), each block's build starts at that block's first call, in
the first generation, which comes after the weights are read: seconds of a cold start in which the build processes
could already have been working. A build needs the block's structure and its call's shapes, not the weights
(artefact_builds.py builds from skeletons). So from_pretrained first rehearses the first generation it expects,
with one step, on networks of the model's structure whose weights are zeros, compiled through the same cache: each
block's first call starts its build as the real one would, and the weights are read while the builds run. The
rehearsal's frames are thrown away; the real first generation finds its builds under way or done.
"""

from __future__ import annotations

import gc

import torch

from .config import ModelConfig
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import OpenCLIPTextEncoder
from .models.unet3d import UNet3D
from .request import GenerationRequest, parse_request

# the request's options that decide which kinds of call a generation makes (the others change values only)
SHAPING_KEYS = ('text', 'num_videos_per_prompt', 'num_frames', 'height', 'width', 'guidance_scale', 'sampler',
                'temporal_window', 'temporal_stride', 'decode_chunk_frames')


def check_compile_ahead(compile_ahead) -> None:
    """from_pretrained's compile_ahead: True, False or a dict of SHAPING_KEYS."""
    if isinstance(compile_ahead, bool):
        return
    if not isinstance(compile_ahead, dict):
        raise TypeError(f'compile_ahead={compile_ahead!r} is not True, False or a dict of request options')
    unknown = sorted(set(compile_ahead) - set(SHAPING_KEYS), key=str)
    if unknown:
        raise ValueError(f'compile_ahead has options {unknown} that do not shape the calls compiled; valid ones '
                         f'are {list(SHAPING_KEYS)}')


def rehearsal_request(compile_ahead: bool | dict, config: ModelConfig) -> GenerationRequest:
    """One step of the video compile_ahead describes (True: the model's default), its frames kept in memory."""
    fields = {} if compile_ahead is True else compile_ahead
    return parse_request({'text': 'a rehearsal', **fields}, config, num_inference_steps=1, seed=0, output_type='frames')


def zeroed_networks(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> tuple:
    """(text encoder, UNet, autoencoder) of the model's structure, their weights zeros on `device` in `dtype`."""
    with torch.device('meta'):
        networks = OpenCLIPTextEncoder(config.text), UNet3D(config.unet), AutoencoderKL(config.autoencoder)
    networks = tuple(network.to(dtype).to_empty(device=device) for network in networks)
    with torch.no_grad():
        for network in networks:
            for tensor in [*network.parameters(), *network.buffers()]:
                tensor.zero_()
    return networks


def start_builds(engine_class, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 request: GenerationRequest, mode: str, cache) -> None:
    """Run `request` on an `engine_class` (TextToVideo) of zeroed_networks compiled in `mode` through `cache`,
    without waiting for the builds its calls start; then free its networks. The cache's list of artefacts used
    stays as it was: the real generation notes what it uses."""
    engine = engine_class(config, *zeroed_networks(config, device, dtype), device=device, dtype=dtype)
    engine.compile_networks(mode, cache)
    engine.compile_cache = None   # a generation waits for its cache's builds: this one leaves them running
    used = list(cache.used)
    try:
        engine(request)
    finally:
        cache.used[:] = used
        del engine
        gc.collect()   # the networks and their compiled calls refer to each other: free their memory now
