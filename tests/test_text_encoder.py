"""OpenCLIP text tower: parity with open_clip's own modules, tokenizer ids, checkpoint key shapes."""

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from reference import randomize_, rel_err

from modelscope_t2v.config import FULL, TINY, TextEncoderConfig
from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder, is_text_tower_key
from modelscope_t2v.tokenizer import END_TOKEN, count_tokens, tokenize

PROMPTS = ['', 'A panda eating bamboo on a rock.',
           'An astronaut riding a horse on Mars, 4k, highly detailed!']
TOL = 1e-5  # worst |ours - ref| / max |ref|, float32 on the CPU


def reference_clip(config: TextEncoderConfig) -> CLIP:
    """open_clip's CLIP with our text tower and a one-block 32-pixel vision tower, seeded noise.

    Built on the meta device and materialised by the noise, which skips open_clip's
    slow initialisation of 350M parameters; the causal mask, a buffer that noise
    does not fill, is taken from the same CLIP built for real at one block.
    """
    def build(layers: int) -> CLIP:
        text_cfg = CLIPTextCfg(context_length=config.context_length, vocab_size=config.vocab_size,
                               width=config.width, heads=config.heads, layers=layers,
                               mlp_ratio=config.mlp_ratio)
        vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=32, patch_size=16)
        return CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()

    with torch.device('meta'):
        clip = build(config.layers)
    clip.to_empty(device='cpu')
    clip.attn_mask = build(1).attn_mask       # (n, n): 0 on and below the diagonal, -inf above
    assert clip.attn_mask.shape == (config.context_length,) * 2 and clip.attn_mask[0, 1] == -float('inf')
    return randomize_(clip, seed=0)


def reference_penultimate(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder(layer='penultimate') as meant, in open_clip's layout."""
    x = clip.token_embedding(tokens) + clip.positional_embedding   # (b, n, c)
    seq_first = not clip.transformer.batch_first
    if seq_first:
        x = x.permute(1, 0, 2)
    for block in clip.transformer.resblocks[:-1]:
        x = block(x, attn_mask=clip.attn_mask)
    if seq_first:
        x = x.permute(1, 0, 2)
    return clip.ln_final(x)


def check_parity(config: TextEncoderConfig) -> float:
    clip = reference_clip(config)
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
