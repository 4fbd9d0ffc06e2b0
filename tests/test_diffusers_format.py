"""diffusers_format: our networks against diffusers' / transformers' own classes, holding the same random weights
converted by the key mapping; exact round trips of keys and configs.

diffusers' UNet3DConditionModel gives its first temporal transformer 8 heads whatever its config says, so the
tiny UNets here take TINY's with num_heads=8 (TINY itself has 2 and raises).
"""

import pytest
import torch
from reference import randomize_, rel_err

from modelscope_t2v import diffusers_format as df
from modelscope_t2v.config import FULL, TINY, AutoencoderConfig, replace
from modelscope_t2v.models.autoencoder import AutoencoderKL
from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
from modelscope_t2v.models.unet3d import UNet3D

TOLERANCE = 1e-5   # float32, the same operations up to summation order
UNET = replace(TINY.unet, num_heads=df.TEMPORAL_IN_HEADS)
# three levels, the deepest without attention as FULL's: DownBlock3D / UpBlock3D, the Upsample at index 1
UNET_3_LEVELS = replace(UNET, dim_mult=(1, 2, 2), attn_scales=(1.0, 0.5))


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_unet(config, seed=0):
    from diffusers import UNet3DConditionModel
    return randomize_(UNet3DConditionModel(**df.unet_config_to_diffusers(config)), seed).eval()


def diffusers_vae(config, seed=0):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    return randomize_(DiffusersAutoencoderKL(**df.autoencoder_config_to_diffusers(config)), seed).eval()


def clip_text_model(config, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel
    return randomize_(CLIPTextModel(CLIPTextConfig(**df.text_config_to_diffusers(config))), seed).eval()


def prefixed(state):
    """Keys as CLIPTextModel files of transformers < 5 hold them; transformers >= 5 drops `text_model.`."""
    return {k if k.startswith(df.HF_TEXT_PREFIX) else df.HF_TEXT_PREFIX + k: v for k, v in state.items()}


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# -- parity: the converted weights give diffusers' outputs -------------------------------------------

@pytest.mark.parametrize('config,size', [(UNET, (10, 6)), (UNET_3_LEVELS, (5, 9))], ids=['10x6', '5x9-3-levels'])
def test_unet_matches_diffusers(config, size):
    """24 frames of non-square latents; 5x9 (zeroscope's 40x72 aspect) upsamples to odd skip sizes."""
    theirs = diffusers_unet(config)
    ours = UNet3D(config).eval()
    ours.load_state_dict(df.unet_from_diffusers(theirs.state_dict()), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 24, *size, generator=g)
    t = torch.tensor([981, 21])
    context = torch.randn(2, 77, config.context_dim, generator=g)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    err = rel_err(got, expected)
    print(f'UNet3D vs UNet3DConditionModel {size}: worst relative error {err:.2e}')
    assert got.shape == expected.shape == x.shape
    assert err < TOLERANCE


def test_autoencoder_matches_diffusers():
    """Both decode unscaled latents; our decode_video divides by the scale as diffusers' pipeline does."""
    config = TINY.autoencoder
    theirs = diffusers_vae(config)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(df.autoencoder_from_diffusers(theirs.state_dict()), strict=True)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 3, 5, 9, generator=g)            # (b c f h w), scaled
    pixels = torch.randn(2, 3, 40, 72, generator=g)
    with torch.no_grad():
        z = latents[0].transpose(0, 1) / theirs.config.scaling_factor   # (f, c, h, w), unscaled
        decoded = theirs.decode(z).sample
        errors = {'decode': rel_err(ours.decode(z), decoded),
                  'decode_video': rel_err(ours.decode_video(latents)[0].transpose(0, 1), decoded),
                  'encode': rel_err(ours.encode(pixels), theirs.encode(pixels).latent_dist.mean)}
    print('AutoencoderKL vs diffusers:', {k: f'{v:.2e}' for k, v in errors.items()})
    assert decoded.shape == (3, 3, 40, 72)
    assert max(errors.values()) < TOLERANCE


def test_text_encoder_matches_clip_text_model():
    config = TINY.text
    theirs = clip_text_model(config)
    ours = OpenCLIPTextEncoder(config).eval()
    ours.load_state_dict(df.text_from_diffusers(theirs.state_dict()), strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, config.context_length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = rel_err(ours(tokens), theirs(tokens).last_hidden_state)
    print(f'OpenCLIPTextEncoder vs CLIPTextModel: worst relative error {err:.2e}')
    assert len(ours.transformer.resblocks) == theirs.config.num_hidden_layers == 2
    assert err < TOLERANCE


# -- exact round trips -----------------------------------------------------------------------------

NETWORKS = {   # name: (ours, diffusers' model, to_diffusers, from_diffusers)
    'unet': (lambda: UNet3D(UNET_3_LEVELS), lambda: diffusers_unet(UNET_3_LEVELS),
             df.unet_to_diffusers, df.unet_from_diffusers),
    'autoencoder': (lambda: AutoencoderKL(TINY.autoencoder), lambda: diffusers_vae(TINY.autoencoder),
                    df.autoencoder_to_diffusers, df.autoencoder_from_diffusers),
    'text': (lambda: OpenCLIPTextEncoder(TINY.text), lambda: clip_text_model(TINY.text),
             df.text_to_diffusers, df.text_from_diffusers),
}


@pytest.mark.parametrize('name', NETWORKS)
def test_round_trips_are_exact(name):
    make_ours, make_theirs, to_diffusers, from_diffusers = NETWORKS[name]
    ours = randomize_(make_ours(), seed=4).state_dict()
    theirs = prefixed(make_theirs().state_dict()) if name == 'text' else make_theirs().state_dict()
    assert_same(from_diffusers(to_diffusers(ours)), ours)
    assert_same(to_diffusers(from_diffusers(theirs)), theirs)
    assert set(to_diffusers(ours)) == set(theirs)
    print(f'{name}: {len(ours)} original keys, {len(theirs)} diffusers keys')


def test_older_file_names_load_the_same():
    """vae/ files of diffusers < 0.15 name the mid-block attention query/key/value/proj_attn; text_encoder/
    files of transformers < 4.31 hold position_ids, of transformers >= 5 no `text_model.` prefix."""
    vae = diffusers_vae(TINY.autoencoder).state_dict()
    old_names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    old_vae = {}
    for key, value in vae.items():
        for new, old in old_names.items():
            key = key.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
        old_vae[key] = value
    assert 'decoder.mid_block.attentions.0.proj_attn.weight' in old_vae
    assert_same(df.autoencoder_from_diffusers(old_vae), df.autoencoder_from_diffusers(vae))

    text = prefixed(clip_text_model(TINY.text).state_dict())
    bare = {k[len(df.HF_TEXT_PREFIX):]: v for k, v in text.items()}
    old_text = {**text, 'text_model.embeddings.position_ids': torch.arange(77)[None]}
    assert_same(df.text_from_diffusers(bare), df.text_from_diffusers(text))
    assert_same(df.text_from_diffusers(old_text), df.text_from_diffusers(text))


@pytest.mark.parametrize('convert', [df.unet_to_diffusers, df.unet_from_diffusers, df.autoencoder_to_diffusers,
                                     df.autoencoder_from_diffusers, df.text_to_diffusers, df.text_from_diffusers])
def test_unknown_key_is_named(convert):
    name = convert.__name__
    network = NETWORKS['text' if name.startswith('text') else 'unet' if name.startswith('unet') else 'autoencoder']
    state = (network[1] if name.endswith('from_diffusers') else network[0])().state_dict()
    state = {**state, 'visual.class_embedding.weight': torch.zeros(3)}
    with pytest.raises(ValueError, match=r"1 keys are not .*\['visual.class_embedding.weight'\]"):
        convert(state)


def test_unet_without_temporal_attention_is_refused():
    state = UNet3D(replace(UNET, temporal_attention=False)).state_dict()
    with pytest.raises(ValueError, match='temporal_attention=False'):
        df.unet_to_diffusers(state)
    with pytest.raises(ValueError, match='temporal_attention=False'):
        df.unet_config_to_diffusers(replace(UNET, temporal_attention=False))


# -- configs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('config', [UNET, UNET_3_LEVELS, FULL.unet], ids=['tiny', 'tiny-3-levels', 'full'])
def test_unet_config_round_trip(config):
    assert df.unet_config_from_diffusers(df.unet_config_to_diffusers(config)) == config


@pytest.mark.parametrize('config', [TINY.autoencoder, FULL.autoencoder, AutoencoderConfig(ch=64, ch_mult=(1, 2))],
                         ids=['tiny', 'full', 'two-levels'])
def test_autoencoder_config_round_trip(config):
    assert df.autoencoder_config_from_diffusers(df.autoencoder_config_to_diffusers(config)) == config


@pytest.mark.parametrize('config', [TINY.text, FULL.text], ids=['tiny', 'full'])
def test_text_config_round_trip(config):
    assert df.text_config_from_diffusers(df.text_config_to_diffusers(config)) == config


# the fields of ali-vilab/text-to-video-ms-1.7b's unet/, vae/ and text_encoder/config.json
PUBLISHED_UNET = {
    '_class_name': 'UNet3DConditionModel', 'act_fn': 'silu', 'attention_head_dim': 64,
    'block_out_channels': [320, 640, 1280, 1280], 'cross_attention_dim': 1024,
    'down_block_types': ['CrossAttnDownBlock3D', 'CrossAttnDownBlock3D', 'CrossAttnDownBlock3D', 'DownBlock3D'],
    'in_channels': 4, 'layers_per_block': 2, 'norm_eps': 1e-05, 'norm_num_groups': 32, 'out_channels': 4,
    'sample_size': 32,
    'up_block_types': ['UpBlock3D', 'CrossAttnUpBlock3D', 'CrossAttnUpBlock3D', 'CrossAttnUpBlock3D']}
PUBLISHED_VAE = {
    '_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4, 'in_channels': 3, 'latent_channels': 4, 'layers_per_block': 2,
    'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 512, 'scaling_factor': 0.18215,
    'up_block_types': ['UpDecoderBlock2D'] * 4}
PUBLISHED_TEXT = {
    'architectures': ['CLIPTextModel'], 'attention_dropout': 0.0, 'bos_token_id': 0, 'dropout': 0.0,
    'eos_token_id': 2, 'hidden_act': 'gelu', 'hidden_size': 1024, 'initializer_factor': 1.0,
    'initializer_range': 0.02, 'intermediate_size': 4096, 'layer_norm_eps': 1e-05, 'max_position_embeddings': 77,
    'model_type': 'clip_text_model', 'num_attention_heads': 16, 'num_hidden_layers': 23, 'pad_token_id': 1,
    'projection_dim': 512, 'vocab_size': 49408}


@pytest.mark.parametrize('published,config,to_diffusers,from_diffusers', [
    (PUBLISHED_UNET, FULL.unet, df.unet_config_to_diffusers, df.unet_config_from_diffusers),
    (PUBLISHED_VAE, FULL.autoencoder, df.autoencoder_config_to_diffusers, df.autoencoder_config_from_diffusers),
    (PUBLISHED_TEXT, FULL.text, df.text_config_to_diffusers, df.text_config_from_diffusers),
], ids=['unet', 'vae', 'text_encoder'])
def test_full_configs_are_the_published_ones(published, config, to_diffusers, from_diffusers):
    ours = to_diffusers(config)
    assert {k: ours[k] for k in published} == published   # ours adds only fields of newer versions, at defaults
    assert from_diffusers(published) == config


@pytest.mark.parametrize('convert,raw,message', [
    (df.unet_config_from_diffusers, {**PUBLISHED_UNET, 'norm_num_groups': 16}, 'norm_num_groups=16'),
    (df.unet_config_from_diffusers, {**PUBLISHED_UNET, 'up_block_types': ['UpBlock3D'] * 4}, 'up_block_types'),
    (df.autoencoder_config_from_diffusers, {**PUBLISHED_VAE, 'shift_factor': 0.1}, 'shift_factor=0.1'),
    (df.text_config_from_diffusers, {**PUBLISHED_TEXT, 'hidden_act': 'quick_gelu'}, "hidden_act='quick_gelu'"),
    (df.text_config_from_diffusers, {k: v for k, v in PUBLISHED_TEXT.items() if k != 'hidden_act'}, 'lacks'),
])
def test_config_outside_the_architecture_is_refused(convert, raw, message):
    with pytest.raises(ValueError, match=message):
        convert(raw)


def test_unet_config_with_other_first_temporal_heads_is_refused():
    with pytest.raises(ValueError, match='num_heads=2'):
        df.unet_config_to_diffusers(TINY.unet)
