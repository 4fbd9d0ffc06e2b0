"""Generate with one model, then re-render its frames with another: zeroscope's 576w -> XL workflow.

    modelscope-t2v "a red kite" --model cerspense/zeroscope_v2_576w --upscale-with cerspense/zeroscope_v2_XL

The first model makes the video at its size; its networks then leave the device, and the second model
re-renders the frames at its own size as video-to-video (init_video, `strength` of the steps).
"""

from __future__ import annotations

import gc
import logging

import torch

from .request import parse_request
from .text_to_video import GenerationResult, TextToVideo, output_paths

logger = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.65   # zeroscope's card: 0.6-0.7
# what the first pass takes of the request; output, size and strength belong to the second
FIRST_PASS_KEYS = ('negative_prompt', 'seed', 'num_videos_per_prompt', 'num_frames', 'height', 'width',
                   'num_inference_steps', 'guidance_scale', 'eta', 'sampler', 'show_progress', 'decode_chunk_frames')


def generate_and_upscale(inputs, model_dir: str, upscale_dir: str, strength: float = DEFAULT_STRENGTH,
                         load: dict | None = None, **options) -> GenerationResult:
    """The videos of `inputs` made by the model of `model_dir`, re-rendered by the one of `upscale_dir`.

    `load` holds TextToVideo.from_pretrained's options for both models (device, compile, base_model of
    the first, ...); `options` are parse_request's: size and frame count (height, width, num_frames)
    are the first pass's, the second renders at its own default size; the output options go to the second.
    """
    load = dict(load or {})
    base_model = load.pop('base_model', None)
    inputs = {'text': inputs} if isinstance(inputs, str) else dict(inputs)
    options = {**{k: v for k, v in inputs.items() if k != 'text'}, **options}   # keyword arguments win
    inputs = {'text': inputs.get('text')}
    first_options = {k: v for k, v in options.items() if k in FIRST_PASS_KEYS}
    second_options = {k: v for k, v in options.items()
                      if k not in ('height', 'width', 'num_frames', 'negative_prompt', 'seed', 'output_video')}

    # 1. both requests are checked before any model loads (the second with the first's frame count)
    first = TextToVideo.from_pretrained(model_dir, base_model=base_model, **load)
    first_request = parse_request(inputs, first.config, output_type='frames', **first_options)

    # 2. the first pass, then its networks leave the device
    frames = first(first_request).frames
    del first
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 3. the second pass re-renders each video from its frames
    second = TextToVideo.from_pretrained(upscale_dir, **load)
    outputs = output_paths(options['output_video'], len(frames)) if options.get('output_video') else [None] * len(frames)
    results = []
    for i, (clip, output) in enumerate(zip(frames, outputs)):
        prompt = i // first_request.num_videos_per_prompt
        request = parse_request(
            {'text': first_request.prompts[prompt], 'negative_prompt': first_request.negative_prompts[prompt]},
            second.config, init_video=clip, strength=strength, output_video=output,
            seed=None if first_request.seed is None else first_request.seed + i,
            **{**second_options, 'num_videos_per_prompt': 1})
        results.append(second(request))
    return GenerationResult(parameters=[p for r in results for p in r.parameters],
                            paths=[p for r in results for p in r.paths],
                            frames=[f for r in results for f in r.frames])
