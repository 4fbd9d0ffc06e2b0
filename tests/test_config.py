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
