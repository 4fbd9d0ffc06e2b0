"""configuration.json -> typed config: the released file, the string booleans, bad keys."""

import json
import os

import pytest

from modelscope_t2v import config as config_lib

# a copy of the released model's configuration.json (shared/reference/ beside the repo)
REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'original-configuration.json')


def test_released_configuration_is_the_full_model():
    with open(REFERENCE) as f:
        raw = json.load(f)
    assert config_lib.from_dict(raw) == config_lib.FULL
    assert config_lib.configuration_json(config_lib.FULL, 'original') == raw  # the maker writes it unchanged


def test_tiny_configuration_round_trips():
    raw = config_lib.configuration_json(config_lib.TINY, 'plugin')
    assert config_lib.from_dict(raw) == config_lib.TINY


@pytest.mark.parametrize('value,expected', [('True', True), ('False', False), (True, True)])
def test_temporal_attention_accepts_the_string_booleans(value, expected):
    raw = config_lib.configuration_json(config_lib.TINY, 'original')
    raw['model']['model_cfg']['temporal_attention'] = value
    assert config_lib.from_dict(raw).unet.temporal_attention is expected


def test_bad_values_are_named():
    raw = config_lib.configuration_json(config_lib.TINY, 'original')
    raw['model']['model_cfg']['temporal_attention'] = 'yes'
    with pytest.raises(ValueError, match="temporal_attention='yes'"):
        config_lib.from_dict(raw)
    raw = config_lib.configuration_json(config_lib.TINY, 'original')
    raw['model']['model_cfg']['unet_dimm'] = 320
    with pytest.raises(ValueError, match='unet_dimm'):
        config_lib.from_dict(raw)
    with pytest.raises(FileNotFoundError, match='configuration.json'):
        config_lib.load('/nonexistent-model-dir')


@pytest.mark.parametrize('name, inside', [
    ('text2video_pytorch_model.pth', True), ('weights/unet.pth', True), ('../unet.pth', False),
    ('a/../../unet.pth', False), ('/abs/unet.pth', False), ('..\\unet.pth', False), ('a\0b.pth', False),
    ('C:unet.pth', False)])
def test_checkpoint_names_stay_inside_the_model_folder(name, inside):
    raw = config_lib.configuration_json(config_lib.TINY, 'original')
    raw['model']['model_args']['ckpt_unet'] = name
    if inside:
        assert config_lib.from_dict(raw).ckpt_unet == name
        return
    with pytest.raises(ValueError, match=r"model_args\.ckpt_unet=.* must name a file inside the model folder"):
        config_lib.from_dict(raw)


def test_every_field_is_checked_however_the_config_is_made():
    """The diffusers layout and replace() build the dataclasses directly: the same checks, by field name."""
    with pytest.raises(ValueError, match=r'^dim_mult=\(\) must be a non-empty list'):
        config_lib.replace(config_lib.TINY.unet, dim_mult=())
    with pytest.raises(ValueError, match=r"^the UNet's in_dim=4 and out_dim=4 must equal the autoencoder's "
                                         r'z_channels=8'):
        config_lib.replace(config_lib.TINY, autoencoder=config_lib.replace(config_lib.TINY.autoencoder, z_channels=8))
    with pytest.raises(ValueError, match=r'^max_frames=1025 must be at most 1024'):
        config_lib.replace(config_lib.TINY, max_frames=1025)
    with pytest.raises(ValueError, match=r'^vocab_size=1000 must be at least 49408'):
        config_lib.TextEncoderConfig(vocab_size=1000)
