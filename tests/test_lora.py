"""LoRAs: the three file formats (read, written, read back), their application to the weights (hand-computed deltas,
bit-exact restoring, fusing, stacking), request checks, and few-step generation (the lcm sampler, MCM and T2V-Turbo
LoRAs with the guidance embedding), on the tiny model with random LoRAs (tools/make_random_lora.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v.config import TINY
from modelscope_t2v.lora import (LoraPair, read_lora, write_cloneofsimo_lora, write_peft_lora,
                                 write_stable_lora)
from modelscope_t2v.lora import names as N
from modelscope_t2v.lora.apply import LoraStack
from modelscope_t2v.models.layers import guidance_embedding
from modelscope_t2v.tools.make_random_lora import make_random_loras, random_lora

pytestmark = pytest.mark.usefixtures('one_thread')

Q = 'unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q'          # a Linear
CONV = 'unet.input_blocks.1.0.in_layers.2'                            # a 3x3 Conv2d
TEMPORAL_CONV = 'unet.input_blocks.1.0.temopral_conv.conv2.3'         # a (3, 1, 1) Conv3d
TEMPORAL_PROJ = 'unet.input_blocks.1.2.proj_in'                       # a 1x1 Conv1d (a Linear in diffusers)
TEXT_K = 'text.transformer.resblocks.1.attn.in_proj.k'                # rows width..2 width of in_proj_weight


@pytest.fixture(scope='module')
def engine(tiny_model_dir):
    """An engine of its own: these tests change its weights (and check that they come back)."""
    return TextToVideo.from_pretrained(tiny_model_dir, device='cpu')


@pytest.fixture(scope='module')
def loras(tmp_path_factory):
    return make_random_loras(str(tmp_path_factory.mktemp('loras')), TINY)


def snapshot(engine) -> dict:
    state = {f'unet.{k}': v.clone() for k, v in engine.unet.state_dict().items()}
    state.update({f'text.{k}': v.clone() for k, v in engine.text_encoder.state_dict().items()})
    return state


def assert_restored(engine, before: dict):
    now = snapshot(engine)
    assert set(now) == set(before), sorted(set(now) ^ set(before))[:5]
    changed = [k for k in before if not torch.equal(before[k], now[k])]
    assert not changed, changed[:5]
    assert engine.unet.time_cond_proj is None and not engine.loras.loaded


def generate(engine, **options):
    values = {'text': 'a cat', 'seed': 1, 'num_inference_steps': 2, 'num_frames': 2, 'height': 32, 'width': 32,
              **options}
    return engine(parse_request(values, engine.config, output_type='latents'))


def pair(shape, rank=2, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoraPair(down=torch.randn(rank, *shape[1:], generator=g),
                    up=torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.1, alpha=alpha)


def param(engine, key):
    component, _, path = key.partition('.')
    return (engine.unet if component == 'unet' else engine.text_encoder).get_parameter(path)


# -- each format loads, changes the output, and comes off bit-exactly ---------------------------------------

@pytest.mark.parametrize('kind', ['stable', 'cloneofsimo', 'cloneofsimo-text', 'peft', 'mcm'])
def test_each_format_changes_the_output_and_unloads_exactly(engine, loras, kind):
    before = snapshot(engine)
    base = generate(engine).latents
    with_lora = generate(engine, lora=loras[kind])
    diff = (with_lora.latents - base).abs().max().item()
    print(f'{kind}: largest change of the latents {diff:.3g}')
    assert diff > 1e-3
    assert with_lora.parameters[0]['lora'] == [loras[kind]] and with_lora.parameters[0]['lora_scale'] == [1.0]
    assert_restored(engine, before)
    assert torch.equal(generate(engine).latents, base)


def test_scale_zero_is_the_base_bit_for_bit(engine, loras):
    base = generate(engine).latents
    assert torch.equal(generate(engine, lora=loras['stable'], lora_scale=0.0).latents, base)


def test_read_lora_detects_each_format(loras):
    counts = {kind: len(read_lora(path, TINY)) for kind, path in loras.items()}
    order = N.unet_injection_order(TINY.unet, N.UNET_TARGETS[0], None)
    assert counts['cloneofsimo'] == len(order) == 247
    assert counts['t2v-turbo'] == 248                         # the same layers and the guidance projection
    assert counts['cloneofsimo-text'] == 6 * TINY.text.used_layers
    assert N.GUIDANCE in read_lora(loras['t2v-turbo'], TINY)
    print(counts)


# -- round trips through the writers ----------------------------------------------------------------------

def all_layers_lora(alpha=None):
    """A pair on every layer of the tiny model (Linear, Conv1d/2d/3d, row blocks, embeddings)."""
    g = torch.Generator().manual_seed(5)
    return random_lora(TINY, N.target_shapes(TINY), 3, g, alpha=alpha)


def test_write_stable_lora_then_read_is_equal_key_for_key(tmp_path):
    weights = all_layers_lora()
    write_stable_lora(tmp_path / 'x.safetensors', weights)
    back = read_lora(tmp_path / 'x.safetensors', TINY)
    assert set(back) == set(weights) and len(back) == 261
    for name, p in weights.items():
        assert torch.equal(back[name].down, p.down) and torch.equal(back[name].up, p.up), name
        assert back[name].alpha is None


def test_writers_keep_every_delta(tmp_path):
    """alpha / r folded (stable_lora, cloneofsimo) or kept (PEFT's adapter_config.json): the same deltas."""
    weights = all_layers_lora(alpha=6.0)
    shapes = N.target_shapes(TINY)
    write_stable_lora(tmp_path / 's.safetensors', weights)
    write_peft_lora(tmp_path / 'peft', weights, TINY)
    for path in (tmp_path / 's.safetensors', tmp_path / 'peft'):
        back = read_lora(path, TINY)
        assert set(back) == set(weights)
        worst = max((back[n].delta(shapes[n]) - p.delta(shapes[n])).abs().max().item() for n, p in weights.items())
        print(f'{path.name}: worst delta error {worst:.2e}')
        assert worst < 1e-6
    cloneofsimo = {n: p for n, p in weights.items()
                   if n in set(N.unet_injection_order(TINY.unet, N.UNET_TARGETS[0], None))}
    (path,) = write_cloneofsimo_lora(str(tmp_path / 'c'), cloneofsimo, TINY)
    back = read_lora(path, TINY)
    assert set(back) == set(cloneofsimo)
    assert all(torch.allclose(back[n].delta(shapes[n]), p.delta(shapes[n]), atol=1e-7) for n, p in cloneofsimo.items())


# -- format details, against the layouts the trainers write -----------------------------------------------

def test_stable_lora_as_the_trainer_writes_it(tmp_path):
    """Linear (r, in)/(out, r); Conv2d loralib-style (r k, in k)/(out k, r k) viewed as the weight; the temporal
    Conv3d's product viewed (out, in, 3, 3, 1) and averaged over dim 3 (sd-webui-text2video's lora_processor);
    an Embedding's product transposed; text q/k/v unfused as 'resblocks.N.attn.k_proj'."""
    g = torch.Generator().manual_seed(1)
    r = 2
    shapes = N.target_shapes(TINY)
    out_c, in_c = shapes[CONV][:2]
    t_out, t_in = shapes[TEMPORAL_CONV][:2]
    width, vocab = TINY.text.width, TINY.text.vocab_size
    tensors = {
        'input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A': torch.randn(r, shapes[Q][1], generator=g),
        'input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_B': torch.randn(shapes[Q][0], r, generator=g),
        'input_blocks.1.0.in_layers.2.lora_A': torch.randn(r * 3, in_c * 3, generator=g),
        'input_blocks.1.0.in_layers.2.lora_B': torch.randn(out_c * 3, r * 3, generator=g),
        'input_blocks.1.0.temopral_conv.conv2.3.lora_A': torch.randn(r * 3, t_in * 3, generator=g),
        'input_blocks.1.0.temopral_conv.conv2.3.lora_B': torch.randn(t_out * 3, r * 3, generator=g),
        'resblocks.1.attn.k_proj.lora_A': torch.randn(r, width, generator=g),
        'resblocks.1.attn.k_proj.lora_B': torch.randn(width, r, generator=g),
        'text_model.embeddings.token_embedding.lora_A': torch.randn(r, vocab, generator=g),
        'text_model.embeddings.token_embedding.lora_B': torch.randn(width, r, generator=g),
    }
    save_file(tensors, str(tmp_path / 'webui.safetensors'), metadata={'stable_lora_text_to_video': 'v1'})
    back = read_lora(tmp_path / 'webui.safetensors', TINY)
    t = lambda stem: (tensors[f'{stem}.lora_B'] @ tensors[f'{stem}.lora_A'])   # noqa: E731
    expected = {
        Q: t('input_blocks.1.1.transformer_blocks.0.attn1.to_q'),
        CONV: t('input_blocks.1.0.in_layers.2').view(shapes[CONV]),
        TEMPORAL_CONV: t('input_blocks.1.0.temopral_conv.conv2.3').view(t_out, t_in, 3, 3, 1).mean(dim=-2,
                                                                                                   keepdim=True)
        .view(shapes[TEMPORAL_CONV]),
        TEXT_K: t('resblocks.1.attn.k_proj'),
        N.TOKEN: t('text_model.embeddings.token_embedding').T,
    }
    assert set(back) == set(expected)
    for name, delta in expected.items():
        err = (back[name].delta(shapes[name]) - delta).abs().max().item()
        assert err < 1e-5 * delta.abs().max().item(), (name, err)


def test_peft_alpha_rank_and_rslora(tmp_path):
    """scale = lora_alpha / r, alpha_pattern per layer (a regex of the path's end), rslora alpha / sqrt(r)."""
    from safetensors.torch import save_file as save
    g = torch.Generator().manual_seed(2)
    name_q = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
    name_k = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k'
    shape = N.target_shapes(TINY)[Q]
    tensors = {f'base_model.model.{n}.lora_{ab}.weight': torch.randn(*(shape[0], 4) if ab == 'B' else (4, shape[1]),
                                                                     generator=g)
               for n in (name_q, name_k) for ab in 'AB'}
    save(tensors, str(tmp_path / 'adapter_model.safetensors'))
    for rslora, expected_q, expected_k in ((False, 8 / 4, 2 / 4), (True, 8 / 2, 2 / 2)):
        config = {'peft_type': 'LORA', 'r': 4, 'lora_alpha': 8, 'alpha_pattern': {'attn1.to_k': 2},
                  'use_rslora': rslora}
        (tmp_path / 'adapter_config.json').write_text(json.dumps(config))
        back = read_lora(tmp_path, TINY)
        assert math.isclose(back[Q].scale, expected_q) and math.isclose(back[Q.replace('to_q', 'to_k')].scale,
                                                                        expected_k)


def test_diffusers_lora_file_without_config_has_scale_one(tmp_path):
    """pytorch_lora_weights.safetensors: 'unet.' / 'text_encoder.' prefixes, no alphas: scale 1."""
    g = torch.Generator().manual_seed(3)
    width = TINY.text.width
    tensors = {'unet.down_blocks.0.attentions.0.proj_in.lora_A.weight': torch.randn(2, 32, generator=g),
               'unet.down_blocks.0.attentions.0.proj_in.lora_B.weight': torch.randn(32, 2, generator=g),
               'text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight': torch.randn(2, width),
               'text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight': torch.randn(width, 2),
               # diffusers' older attention-processor names
               'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight':
                   torch.randn(2, 32),
               'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight':
                   torch.randn(32, 2)}
    save_file(tensors, str(tmp_path / 'pytorch_lora_weights.safetensors'))
    back = read_lora(tmp_path, TINY)
    assert set(back) == {'unet.input_blocks.1.1.proj_in', 'text.transformer.resblocks.0.attn.in_proj.v',
                         'unet.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0'}
    assert all(p.scale == 1.0 for p in back.values())


def test_cloneofsimo_text_order_is_transformers_registration_order():
    """cloneofsimo's list follows named_modules() of CLIPEncoderLayer: k, v, q, out_proj, fc1, fc2."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    with torch.device('meta'):
        layer = CLIPEncoderLayer(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=2))
    linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    ours = N.text_injection_order(TINY.text, ('CLIPEncoderLayer',))[:6]
    clip = {v: k for k, v in N.text_from_clip(1).items()}
    assert [clip[n].removeprefix('encoder.layers.0.') for n in ours] == linears
    assert linears == ['self_attn.k_proj', 'self_attn.v_proj', 'self_attn.q_proj', 'self_attn.out_proj',
                       'mlp.fc1', 'mlp.fc2']


def test_unknown_names_and_bad_shapes_are_listed(tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {f'input_blocks.1.1.zz_layer_{i}.lora_{ab}': torch.randn(2, 2, generator=g)
               for i in range(12) for ab in 'AB'}
    tensors['input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A'] = torch.randn(2, 7)
    tensors['input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_B'] = torch.randn(64, 2)   # out is 32
    save_file(tensors, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(ValueError) as error:
        read_lora(tmp_path / 'bad.safetensors', TINY)
    message = str(error.value)
    print(message)
    assert '13 entries do not fit' in message and 'and 3 more' in message
    assert 'unet.input_blocks.1.1.zz_layer_0: no such layer' in message
    assert 'to_q: down (2, 7) / up (64, 2) do not make a (32, 32) weight' in message


# -- application: hand computations, stacking, fusing -----------------------------------------------------

def test_applied_delta_equals_scale_up_down(engine):
    before = snapshot(engine)
    shapes = N.target_shapes(TINY)
    weights = {name: pair(shapes[name], alpha=3.0, seed=i)
               for i, name in enumerate((Q, CONV, TEMPORAL_CONV, TEMPORAL_PROJ, TEXT_K))}
    engine.loras.load(weights, 0.7, 'hand')
    try:
        for name, p in weights.items():
            key = name.rsplit('.in_proj.', 1)[0] + '.attn.in_proj_weight' if 'in_proj.' in name else name + '.weight'
            key = key.replace('.attn.attn.', '.attn.')
            new, old = param(engine, key), before[key]
            expected = 0.7 * 3.0 / 2 * (p.up.flatten(1) @ p.down.flatten(1))
            if name == TEXT_K:   # rows width..2 width only
                w = TINY.text.width
                assert torch.equal(new[:w], old[:w]) and torch.equal(new[2 * w:], old[2 * w:])
                new, old = new[w:2 * w], old[w:2 * w]
            err = (new - old - expected.reshape(old.shape)).abs().max().item()
            print(f'{name}: worst error {err:.2e}')
            assert err < 1e-6
    finally:
        engine.unload_lora('hand')
    assert_restored(engine, before)


def test_two_loras_add_their_deltas_and_unload_in_any_order(engine, loras):
    before = snapshot(engine)
    engine.load_lora(loras['stable'], scale=0.5, name='a')
    one = snapshot(engine)
    engine.load_lora(loras['peft'], scale=-1.5, name='b')
    both = snapshot(engine)
    engine.unload_lora('a')
    only_b = snapshot(engine)
    engine.unload_lora('b')
    assert_restored(engine, before)
    worst = max((both[k] - before[k] - (one[k] - before[k]) - (only_b[k] - before[k])).abs().max().item()
                for k in before)
    print(f'two LoRAs: worst error of delta(a + b) - delta(a) - delta(b): {worst:.2e}')
    assert worst < 1e-6
    assert any(not torch.equal(one[k], before[k]) for k in before)


def test_fuse_and_unfuse(engine, loras):
    before = snapshot(engine)
    engine.load_lora(loras['stable'], name='fused')
    engine.fuse_lora()
    fused = snapshot(engine)
    engine.unload_lora()                              # fused LoRAs stay
    assert all(torch.equal(fused[k], v) for k, v in snapshot(engine).items())
    generate(engine, lora=loras['peft'])              # a request's LoRA stacks on top and comes off
    assert all(torch.equal(fused[k], v) for k, v in snapshot(engine).items())
    engine.unfuse_lora()
    assert_restored(engine, before)


def test_channels_last_and_frame_major_weights_take_the_same_delta():
    """to_channels_last stores Conv2d weights channels-last and temporal Conv3d weights taps-first (views):
    the LoRA writes through those layouts."""
    from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
    from modelscope_t2v.models.unet3d import UNet3D
    torch.manual_seed(0)
    plain, text = UNet3D(TINY.unet).eval(), OpenCLIPTextEncoder(TINY.text)
    fast = UNet3D(TINY.unet).eval()
    fast.load_state_dict(plain.state_dict())
    fast.to_channels_last()
    shapes = N.target_shapes(TINY)
    weights = {name: pair(shapes[name], seed=i) for i, name in enumerate((CONV, TEMPORAL_CONV))}
    for unet in (plain, fast):
        LoraStack(lambda unet=unet: {'unet': unet, 'text': text}).load(weights, 1.0, 'x')
    assert torch.equal(plain.get_parameter(CONV[5:] + '.weight'), fast.get_parameter(CONV[5:] + '.weight'))
    assert torch.equal(plain.get_parameter(TEMPORAL_CONV[5:] + '.weight'),
                       fast.get_parameter(TEMPORAL_CONV[5:] + '.weight'))
    assert not fast.get_parameter(TEMPORAL_CONV[5:] + '.weight').is_contiguous()


def test_a_lora_that_does_not_fit_changes_nothing(engine):
    before = snapshot(engine)
    shapes = N.target_shapes(TINY)
    weights = {Q: pair(shapes[Q]), 'unet.nowhere': pair((4, 4)), CONV: pair((3, 3))}
    with pytest.raises(ValueError, match="2 entries do not fit.*unet.nowhere: no such layer"):
        engine.loras.load(weights, 1.0, 'bad')
    assert_restored(engine, before)


# -- requests, command line, batch lines ------------------------------------------------------------------

@pytest.mark.parametrize('options,error,match', [
    ({'lora': 'missing.safetensors'}, ValueError, "lora='missing.safetensors' is neither an existing file"),
    ({'lora': 5}, TypeError, 'lora must be a path or hub id'),
    ({'lora': [None]}, TypeError, 'lora must hold paths'),
    ({'lora_scale': 0.5}, ValueError, 'lora_scale=0.5 is given without lora'),
    ({'lora': ['a/b', 'c/d'], 'lora_scale': [1.0]}, ValueError, 'lora_scale has 1 values for 2 LoRAs'),
    ({'lora': 'a/b', 'lora_scale': 11}, ValueError, r'lora_scale=11.0 is outside the valid range \[-10.0, 10.0\]'),
    ({'lora': 'a/b', 'lora_scale': 'x'}, TypeError, 'lora_scale must be a number'),
    ({'sampler': 'lcm', 'num_inference_steps': 51}, ValueError, 'num_inference_steps=51 is outside the valid '
                                                                 'range 1..50'),
])
def test_request_checks(options, error, match):
    with pytest.raises(error, match=match):
        parse_request({'text': 'a cat', **options}, TINY)


def test_request_defaults():
    lcm = parse_request({'text': 'a cat', 'sampler': 'lcm'}, TINY)
    assert lcm.num_inference_steps == 4 and parse_request('a cat', TINY).num_inference_steps == 50
    r = parse_request({'text': 'a cat', 'lora': ['a/b', 'c/d/e'], 'lora_scale': 0.5}, TINY)
    assert r.lora == ('a/b', 'c/d/e') and r.lora_scale == (0.5, 0.5)


def test_cli_and_batch_lines_take_loras(tmp_path, loras):
    from modelscope_t2v.batch import parse_line
    from modelscope_t2v.cli import build_parser, generation_options
    args = build_parser().parse_args(['a cat', '--lora', 'x/y', '--lora', loras['stable'], '--lora-scale', '0.5'])
    assert generation_options(args) == {'lora': ['x/y', loras['stable']], 'lora_scale': 0.5}
    args = build_parser().parse_args(['a cat', '--lora', 'x/y', '--lora', 'z/w', '--lora-scale', '0.5',
                                      '--lora-scale', '2'])
    assert generation_options(args)['lora_scale'] == [0.5, 2.0]
    line = json.dumps({'text': 'a cat', 'lora': loras['mcm'], 'lora_scale': 0.8, 'sampler': 'lcm'})
    item = parse_line(1, line, str(tmp_path), TINY, {})
    assert item.request.lora == (loras['mcm'],) and item.request.lora_scale == (0.8,)
    assert item.request.num_inference_steps == 4


def test_hub_lora_offline_names_the_id(monkeypatch):
    import huggingface_hub

    from modelscope_t2v.hub import ModelNotFound, resolve_lora

    def offline(*args, **kwargs):
        raise ConnectionError('no network')

    monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
    with pytest.raises(ModelNotFound, match=r"could not get the LoRA 'yhzhai/mcm/modelscopet2v-laion'.*Without "
                                            'network, pass a local LoRA file'):
        resolve_lora('yhzhai/mcm/modelscopet2v-laion')


# -- few-step generation ---------------------------------------------------------------------------------

def unet_calls(engine, monkeypatch):
    calls = []
    forward = type(engine.unet).forward

    def spy(self, x, t, context=None, guidance=None):
        calls.append((int(t[0]), self.remembered_texts if context is None else context.shape[0],
                      None if guidance is None else guidance.tolist()))
        return forward(self, x, t, context, guidance)

    monkeypatch.setattr(type(engine.unet), 'forward', spy)
    return calls


def test_lcm_runs_four_steps_without_guidance(engine, monkeypatch):
    calls = unet_calls(engine, monkeypatch)
    result = engine(parse_request({'text': 'a cat', 'seed': 1, 'num_frames': 2, 'height': 32, 'width': 32,
                                   'sampler': 'lcm', 'guidance_scale': 9.0}, engine.config, output_type='latents'))
    assert calls == [(999, 1, None), (759, 1, None), (499, 1, None), (259, 1, None)]
    assert result.parameters[0]['num_inference_steps'] == 4 and torch.isfinite(result.latents).all()
    # no guidance embedding: the scale changes nothing
    assert torch.equal(generate(engine, sampler='lcm', guidance_scale=2.0).latents,
                       generate(engine, sampler='lcm', guidance_scale=9.0).latents)


def test_mcm_lora_two_lcm_steps(engine, loras):
    before = snapshot(engine)
    base = generate(engine, sampler='lcm', guidance_scale=1.0).latents
    mcm = generate(engine, sampler='lcm', guidance_scale=1.0, lora=loras['mcm']).latents
    diff = (mcm - base).abs().max().item()
    print(f'MCM-like LoRA, 2 lcm steps: largest change {diff:.3g}')
    assert diff > 1e-3 and torch.isfinite(mcm).all()
    assert_restored(engine, before)


def test_t2v_turbo_lora_brings_the_guidance_embedding(engine, loras, monkeypatch):
    before = snapshot(engine)
    calls = unet_calls(engine, monkeypatch)
    turbo = generate(engine, sampler='lcm', guidance_scale=7.5, lora=loras['t2v-turbo'])
    assert [c[1:] for c in calls] == [(1, [7.5]), (1, [7.5])]     # one text, w = 7.5 for the one video
    assert_restored(engine, before)                                 # the embedding leaves with the LoRA
    other_w = generate(engine, sampler='lcm', guidance_scale=3.0, lora=loras['t2v-turbo']).latents
    diff = (turbo.latents - other_w).abs().max().item()
    print(f'T2V-Turbo-like LoRA: w 7.5 against 3.0 changes the latents by {diff:.3g}')
    assert diff > 1e-4
    # at scale 0 the projection is all zeros: the base UNet's result, bit for bit
    base = generate(engine, sampler='lcm', guidance_scale=7.5).latents
    assert torch.equal(generate(engine, sampler='lcm', guidance_scale=7.5, lora=loras['t2v-turbo'],
                                lora_scale=0.0).latents, base)


def test_guidance_embedding_is_t2v_turbos():
    """T2V-Turbo's get_w_embedding (pipeline/t2v_turbo_ms_pipeline.py), derived again: w x 1000 times
    exp(-i log(10000) / (half - 1)), sines then cosines, 256 wide."""
    w = torch.tensor([7.5, 1.0, 0.0]) * 1000.0
    half = 128
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    angles = w[:, None] * torch.exp(torch.arange(half, dtype=torch.float32) * -step)[None]
    expected = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    assert torch.equal(guidance_embedding(w / 1000.0, 256), expected)


# -- parity with diffusers + peft -------------------------------------------------------------------------

def test_peft_lora_matches_diffusers_unet_with_peft(tmp_path):
    """The same PEFT adapter (write_peft_lora) in peft over diffusers' UNet3DConditionModel and applied to our
    UNet3D holding the converted weights: one forward, float32."""
    from diffusers import UNet3DConditionModel
    from peft import PeftModel
    from reference import randomize_, rel_err

    from modelscope_t2v import diffusers_format as df
    from modelscope_t2v.config import replace
    from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
    from modelscope_t2v.models.unet3d import UNet3D
    config = replace(TINY, unet=replace(TINY.unet, num_heads=df.TEMPORAL_IN_HEADS))
    theirs = randomize_(UNet3DConditionModel(**df.unet_config_to_diffusers(config.unet)), 0).eval()
    ours = UNet3D(config.unet).eval()
    ours.load_state_dict(df.unet_from_diffusers(theirs.state_dict()), strict=True)
    names = [n for n in N.target_shapes(config) if n.startswith('unet.') and n != N.GUIDANCE]
    weights = random_lora(config, names, 4, torch.Generator().manual_seed(7), alpha=8.0)
    weights = {n: LoraPair(p.down, p.up * 4, p.alpha) for n, p in weights.items()}   # a visible change
    write_peft_lora(tmp_path / 'adapter', weights, config)
    peft_unet = PeftModel.from_pretrained(theirs, str(tmp_path / 'adapter')).eval()
    LoraStack(lambda: {'unet': ours, 'text': OpenCLIPTextEncoder(config.text)}).load(weights, 1.0, 'x')
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 3, 4, 4, generator=g), torch.tensor([500])
    context = torch.randn(1, 77, config.unet.context_dim, generator=g)
    with torch.no_grad():
        expected = peft_unet(x, t, encoder_hidden_states=context).sample
        base = peft_unet.get_base_model()
        with peft_unet.disable_adapter():
            without = base(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    err, effect = rel_err(got, expected), rel_err(without, expected)
    print(f'{len(weights)} layers: ours vs diffusers + peft {err:.2e}; the LoRA itself moves the output {effect:.2e}')
    assert err < 1e-4 and effect > 1e-2


def test_peft_lora_matches_clip_text_model_with_peft(tmp_path):
    """The text encoder's adapter (FOLDER/text_encoder/: q/k/v as CLIP's separate projections, the token
    Embedding) in peft over transformers' CLIPTextModel, against our fused in_proj with row-block deltas."""
    from peft import PeftModel
    from reference import randomize_, rel_err
    from transformers import CLIPTextConfig, CLIPTextModel

    from modelscope_t2v import diffusers_format as df
    from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
    from modelscope_t2v.models.unet3d import UNet3D
    theirs = randomize_(CLIPTextModel(CLIPTextConfig(**df.text_config_to_diffusers(TINY.text))), 0).eval()
    ours = OpenCLIPTextEncoder(TINY.text).eval()
    ours.load_state_dict(df.text_from_diffusers(theirs.state_dict()), strict=True)
    names = [n for n in N.target_shapes(TINY) if n.startswith('text.') and n != N.POSITION]
    weights = random_lora(TINY, names, 4, torch.Generator().manual_seed(8), alpha=2.0)
    weights = {n: LoraPair(p.down, p.up * 10, p.alpha) for n, p in weights.items()}
    write_peft_lora(tmp_path / 'adapter', weights, TINY)
    peft_text = PeftModel.from_pretrained(theirs, str(tmp_path / 'adapter' / 'text_encoder')).eval()
    LoraStack(lambda: {'unet': UNet3D(TINY.unet), 'text': ours}).load(weights, 1.0, 'x')
    tokens = torch.randint(0, TINY.text.vocab_size, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_text(input_ids=tokens).last_hidden_state
        with peft_text.disable_adapter():
            without = peft_text(input_ids=tokens).last_hidden_state
        got = ours(tokens)
    err, effect = rel_err(got, expected), rel_err(without, expected)
    print(f'{len(weights)} text layers: ours vs CLIPTextModel + peft {err:.2e}; the LoRA moves the output {effect:.2e}')
    assert err < 1e-5 and effect > 1e-2
