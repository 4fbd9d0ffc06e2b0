"""low_memory=True: the same video as the default placement; the text encoder and autoencoder rest on the CPU.

What it saves is GPU memory, measured by bench/benchmark.py (docs/benchmarks.md);
here the CPU checks that the stage-by-stage placement changes no number.
"""

import numpy as np

from modelscope_t2v import TextToVideo, parse_request

SMALL = {'num_frames': 4, 'height': 64, 'width': 64, 'num_inference_steps': 3, 'seed': 7, 'output_type': 'frames'}


def test_low_memory_gives_the_same_frames(tiny_model_dir, tiny_engine):
    low = TextToVideo.from_pretrained(tiny_model_dir, device='cpu', low_memory=True)
    used = []
    for name in ('text_encoder', 'autoencoder'):
        getattr(low, name).register_forward_pre_hook(lambda module, args, name=name: used.append(name))
    request = {'text': 'a panda playing the guitar'}
    got = low(parse_request(request, low.config, **SMALL)).frames[0]
    expected = tiny_engine(parse_request(request, tiny_engine.config, **SMALL)).frames[0]
    assert got.shape == expected.shape == (4, 64, 64, 3)
    assert np.array_equal(got, expected)
    assert used.count('text_encoder') == 1  # prompt and negative prompt in one pass
    assert {p.device.type for p in low.text_encoder.parameters()} == {'cpu'}
    assert {p.device.type for p in low.autoencoder.parameters()} == {'cpu'}

