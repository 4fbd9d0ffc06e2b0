"""The text stage of a default generation (prompt and negative prompt, one batch of 2), eager and compiled.

    python bench/text_timing.py        # GPU, real-size random OpenCLIP text tower, float16

Prints per variant: first-call seconds (compile), the median milliseconds of an encoding,
and its largest difference from the eager encoding. The eager tower launches a few hundred
small kernels one by one from the host; under CUDA graphs ('reduce-overhead') one launch replays them.
"""
import time

import torch

from measure import median_time, sync
from modelscope_t2v import tokenizer
from modelscope_t2v.config import FULL
from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
from modelscope_t2v.text_to_video import compile_options

torch.manual_seed(0)
with torch.device('cuda'):
    encoder = OpenCLIPTextEncoder(FULL.text).half().eval().requires_grad_(False)
tokens = tokenizer.tokenize(['a panda eating bamboo on a rock', ''], context_length=FULL.text.context_length).cuda()
with torch.no_grad():
    reference = encoder(tokens).float()


def report(name, encode):
    start = time.perf_counter()
    with torch.no_grad():
        out = encode(tokens).clone()   # a CUDA graph's output is overwritten by its next replay
        sync()
        first = time.perf_counter() - start
        seconds = median_time(lambda: encode(tokens), 50)
    err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    print(f'{name:28s} first {first:6.1f} s  text {seconds * 1e3:6.2f} ms  max rel diff {err:.1e}', flush=True)


report('eager', encoder)
report('compiled default', torch.compile(encoder, dynamic=False, options=compile_options('default')))
report('compiled reduce-overhead', torch.compile(encoder, dynamic=False, options=compile_options('reduce-overhead')))
