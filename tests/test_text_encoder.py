"""OpenCLIP text tower: parity with open_clip's own modules, tokenizer ids, checkpoint key shapes."""

import subprocess
import sys

import open_clip
import pytest
import torch
from reference import randomize_, reference_clip, reference_penultimate, rel_err

from modelscope_t2v.config import FULL, TINY, TextEncoderConfig
from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder, is_text_tower_key
from modelscope_t2v.tokenizer import END_TOKEN, count_tokens, tokenize

PROMPTS = ['', 'A panda eating bamboo on a rock.',
           'An astronaut riding a horse on Mars, 4k, highly detailed!']
TOL = 1e-5  # worst |ours - ref| / max |ref|, float32 on the CPU


def check_parity(config: TextEncoderConfig) -> float:
    clip = randomize_(reference_clip(config), seed=0)
    with torch.device('meta'):
        ours = OpenCLIPTextEncoder(config).eval()
    text_sd = {k: v for k, v in clip.state_dict().items() if is_text_tower_key(k, config)}
    ours.load_state_dict(text_sd, strict=True, assign=True)   # meta -> the reference's tensors
    tokens = tokenize(PROMPTS)
    with torch.no_grad():
        ref = reference_penultimate(clip, tokens)
        out = ours(tokens)
    assert out.shape == ref.shape == (len(PROMPTS), config.context_length, config.width)
    err = rel_err(out, ref)
    print(f'text encoder width={config.width} layers={config.layers}: '
          f'worst relative error {err:.2e} (tolerance {TOL:.0e})')
    return err


def test_parity_tiny():
    assert check_parity(TINY.text) < TOL


@pytest.mark.slow
def test_parity_full():
    text_cfg = open_clip.get_model_config('ViT-H-14')['text_cfg']
    for field in ('context_length', 'vocab_size', 'width', 'heads', 'layers'):
        assert getattr(FULL.text, field) == text_cfg[field], field
    assert check_parity(FULL.text) < TOL


def test_tokenizer_matches_open_clip():
    assert torch.equal(tokenize(['']), open_clip.tokenize(['']))
    assert torch.equal(tokenize(PROMPTS), open_clip.tokenize(PROMPTS))
    assert count_tokens('') == 2


def test_a_process_tokenizes_without_importing_open_clips_models(tiny_model_dir):
    """open_clip's package __init__ imports its models and torchvision; the tokenizer needs neither."""
    script = (f'from modelscope_t2v import TextToVideo, parse_request; import sys; '
              f'engine = TextToVideo.from_pretrained({str(tiny_model_dir)!r}, device="cpu"); '
              f'engine(parse_request({{"text": "A panda", "seed": 1}}, engine.config, output_type="frames", '
              f'num_inference_steps=1)); '
              f'print(sorted(name for name in ("open_clip", "torchvision", "timm") if name in sys.modules))')
    imported = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True).stdout
    assert imported.strip().splitlines()[-1] == '[]'


def test_long_prompt_is_truncated():
    prompt = ' '.join(['word'] * 100)
    ids = tokenize([prompt])
    assert ids.shape == (1, 77)
    assert ids[0, -1].item() == END_TOKEN
    assert torch.equal(ids, open_clip.tokenize([prompt]))
    assert count_tokens(prompt) == 102  # 'word' is one BPE token, plus start and end


def test_full_structure_matches_vit_h_14():
    config = FULL.text
    with torch.device('meta'):   # shapes only; no 1B-parameter initialisation
        clip_sd = open_clip.create_model('ViT-H-14', pretrained=None, device='meta').state_dict()
        whole = OpenCLIPTextEncoder(config, layers=config.layers)
        penultimate = OpenCLIPTextEncoder(config)
    ours = {k: tuple(v.shape) for k, v in whole.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in clip_sd.items()
              if is_text_tower_key(k, config, layers=config.layers)}
    assert ours == theirs
    assert len(ours) == 4 + 12 * config.layers
    # Penultimate encoder: every text key but the last block's; the rest are the known unused ones.
    kept = {k for k in clip_sd if is_text_tower_key(k, config)}
    assert kept == set(penultimate.state_dict())
    last = f'transformer.resblocks.{config.layers - 1}.'
    dropped = {k for k in clip_sd if k not in kept
               and not k.startswith(('visual.', last)) and k not in ('text_projection', 'logit_scale')}
    assert dropped == set()
    assert sum(k.startswith(last) for k in clip_sd) == 12


def test_random_init_is_seeded_and_causal():
    config = TINY.text
    encoders = [OpenCLIPTextEncoder(config, layers=config.layers) for _ in range(2)]
    for enc in encoders:
        enc.reset_parameters(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (enc(tokenize(PROMPTS)) for enc in encoders)
    assert torch.equal(a, b)
    # Every prompt starts with the start token and attention is causal: position 0 agrees exactly.
    first = (a[:, 0] - a[0, 0]).abs().max().item()
    later = (a[1, 1:] - a[2, 1:]).abs().max().item()
    print(f'random tiny text encoder: position 0 differs by {first:.1e}, later positions by {later:.3f}')
    assert first < 1e-6 and later > 0.1
