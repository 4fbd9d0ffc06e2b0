"""weights.py: safe reading (no code runs), the checkpoint layouts, mmap, strict loading, errors."""

import builtins
import collections
import os
import shutil
import sys
import types

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from modelscope_t2v import TextToVideo, weights
from modelscope_t2v.config import TINY
from modelscope_t2v.models.autoencoder import AutoencoderKL
from modelscope_t2v.models.text_encoder import OpenCLIPTextEncoder
from modelscope_t2v.models.unet3d import UNet3D
from modelscope_t2v.weights import AUTOENCODER_PREFIX, CheckpointError

PL = 'pytorch_lightning'


def _tensors(seed: int = 0) -> dict:
    """A few autoencoder-like tensors, keys without the prefix."""
    gen = torch.Generator().manual_seed(seed)
    return {'encoder.conv_in.weight': torch.randn(8, 3, 3, 3, generator=gen),
            'encoder.conv_in.bias': torch.randn(8, generator=gen),
            'quant_conv.weight': torch.randn(8, 8, 1, 1, generator=gen)}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _truncate(path) -> None:
    """Keep the first half of a file."""
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


# -- a Lightning-style training checkpoint, written while a fake pytorch_lightning exists ---------

_FAKE_MODULES = (PL, f'{PL}.callbacks', f'{PL}.callbacks.model_checkpoint',
                 f'{PL}.utilities', f'{PL}.utilities.parsing')


def _install_fake_lightning(marker: str) -> None:
    """Fake pytorch_lightning modules whose classes write `marker` when unpickled."""
    mods = {name: types.ModuleType(name) for name in _FAKE_MODULES}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_path = 'val/rec_loss', 'epoch=12.ckpt'

        def __setstate__(self, state):
            with open(marker, 'a') as f:
                f.write('ModelCheckpoint.__setstate__ ran\n')
            self.__dict__.update(state)

    class AttributeDict(dict):
        def __setstate__(self, state):
            with open(marker, 'a') as f:
                f.write('AttributeDict.__setstate__ ran\n')
            self.__dict__.update(state)

    for cls, mod in ((ModelCheckpoint, f'{PL}.callbacks.model_checkpoint'),
                     (AttributeDict, f'{PL}.utilities.parsing')):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    sys.modules.update(mods)


def _remove_fake_lightning() -> None:
    for name in _FAKE_MODULES:
        sys.modules.pop(name, None)


class _ImportSpy:
    """A meta-path finder that records every attempt to import pytorch_lightning."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == PL:
            self.attempts.append(name)
        return None


@pytest.fixture
def lightning_checkpoint(tmp_path):
    """(path, marker, tensors): a .pth naming fake Lightning classes, which are gone again."""
    marker = str(tmp_path / 'lightning-code-ran')
    want = _tensors()
    _install_fake_lightning(marker)
    try:
        mc = sys.modules[f'{PL}.callbacks.model_checkpoint'].ModelCheckpoint
        hparams = sys.modules[f'{PL}.utilities.parsing'].AttributeDict(embed_dim=4, ckpt_path=None)
        hparams.note = 'instance state, so that unpickling calls __setstate__'
        state = {AUTOENCODER_PREFIX + k: v for k, v in want.items()}
        state['model.diffusion_model.out.0.weight'] = torch.ones(4)
        path = str(tmp_path / 'VQGAN_autoencoder.pth')
        torch.save({'state_dict': state, 'callbacks': {mc: mc()}, 'hyper_parameters': hparams,
                    'epoch': 12, 'pytorch-lightning_version': '1.4.2'}, path)
    finally:
        _remove_fake_lightning()
    assert PL not in sys.modules
    yield path, marker, want
    _remove_fake_lightning()


def test_lightning_checkpoint_loads_tensors_without_importing_or_running_lightning(lightning_checkpoint):
    path, marker, want = lightning_checkpoint
    spy = _ImportSpy()
    sys.meta_path.insert(0, spy)
    try:
        got = weights.autoencoder_state_dict(path)
    finally:
        sys.meta_path.remove(spy)
    _assert_same(got, want)
    assert spy.attempts == []
    assert PL not in sys.modules
    assert not os.path.exists(marker)

    # The classes stand in as inert placeholders, not as anything importable.
    checkpoint = weights.read_checkpoint(path)
    (callback_cls, callback), = checkpoint['callbacks'].items()
    assert callback_cls.__name__ == 'ModelCheckpoint' and callback_cls.__module__ == '<placeholder>'
    assert isinstance(callback, weights._Placeholder)
    assert isinstance(checkpoint['hyper_parameters'], weights._Placeholder)
    assert checkpoint['epoch'] == 12
    assert not os.path.exists(marker)


def test_lightning_classes_do_not_run_even_when_importable(lightning_checkpoint):
    path, marker, want = lightning_checkpoint
    _install_fake_lightning(marker)
    _assert_same(weights.autoencoder_state_dict(path), want)
    assert not os.path.exists(marker)
    # Control: the file really does run the classes' code when unpickled the ordinary way.
    torch.load(path, weights_only=False)
    with open(marker) as f:
        ran = f.read()
    assert 'ModelCheckpoint.__setstate__ ran' in ran and 'AttributeDict.__setstate__ ran' in ran


class _Call:
    """Pickles as a call `fn(*args)`: what a malicious checkpoint smuggles in."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_reduce_to_os_system_or_eval_is_never_called(tmp_path):
    markers = [tmp_path / f'marker-{i}' for i in range(3)]
    want = _tensors(1)
    payload = [_Call(os.system, f'touch {markers[0]}'),
               _Call(builtins.eval, f'open({str(markers[1])!r}, "w").close()'),
               _Call(builtins.exec, f'open({str(markers[2])!r}, "w").close()')]
    path = tmp_path / 'VQGAN_autoencoder.pth'
    torch.save({'state_dict': {AUTOENCODER_PREFIX + k: v for k, v in want.items()},
                'payload': payload}, path)
    bare = tmp_path / 'unet.pth'
    torch.save({'w': torch.ones(2), 'hook': _Call(os.system, f'touch {markers[0]}')}, bare)

    _assert_same(weights.autoencoder_state_dict(path), want)
    got = weights.read_checkpoint(path)['payload']
    assert len(got) == 3 and all(isinstance(p, weights._Placeholder) for p in got)
    with pytest.raises(CheckpointError, match='not a state dict of tensors') as error:
        weights.unet_state_dict(bare)
    assert str(bare) in str(error.value) and "'hook'" in str(error.value)
    assert not any(m.exists() for m in markers)

    # Control: ordinary unpickling does run the payload.
    torch.load(path, weights_only=False)
    assert all(m.exists() for m in markers)


# -- the layouts -----------------------------------------------------------------------------

def test_full_checkpoint_keeps_only_autoencoder_keys_prefix_stripped(tmp_path):
    want = _tensors(2)
    state = {AUTOENCODER_PREFIX + k: v for k, v in want.items()}
    state.update({'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(3),
                  'cond_stage_model.model.positional_embedding': torch.zeros(3),
                  'first_stage_model_ema.encoder.conv_in.weight': torch.zeros(3),  # not the prefix
                  'model_ema.first_stage_model.decoder.x': torch.zeros(3)})
    path = tmp_path / 'full.pth'
    torch.save({'state_dict': state, 'global_step': 7}, path)
    _assert_same(weights.autoencoder_state_dict(path), want)

    bare = tmp_path / 'bare.pth'  # a conversion cache: taken as is
    torch.save(want, bare)
    _assert_same(weights.autoencoder_state_dict(bare), want)


def test_full_checkpoint_without_autoencoder_keys_names_file_and_keys(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': {'model.diffusion_model.b': torch.zeros(1),
                               'model.diffusion_model.a': torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError) as error:
        weights.autoencoder_state_dict(path)
    message = str(error.value)
    assert str(path) in message and AUTOENCODER_PREFIX in message
    assert "['model.diffusion_model.a', 'model.diffusion_model.b']" in message


def test_full_checkpoint_with_non_tensor_autoencoder_value_is_a_checkpoint_error(tmp_path):
    path = tmp_path / 'odd.pth'
    state = {AUTOENCODER_PREFIX + 'encoder.conv_in.weight': torch.zeros(1),
             AUTOENCODER_PREFIX + 'encoder.conv_in.bias': _Call(os.getcwd)}
    torch.save({'state_dict': state}, path)
    with pytest.raises(CheckpointError, match='1 values are not tensors') as error:
        weights.autoencoder_state_dict(path)
    message = str(error.value)
    assert str(path) in message and "'encoder.conv_in.bias'" in message
    assert "'encoder.conv_in.weight'" not in message


# -- memory mapping --------------------------------------------------------------------------

def _mapped_ranges(path) -> list:
    """[start, end) address ranges at which this process maps `path` (Linux /proc/self/maps)."""
    real, ranges = os.path.realpath(path), []
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                start, end = (int(x, 16) for x in fields[0].split('-'))
                ranges.append((start, end))
    return ranges


def _all_mapped(state: dict, path) -> bool:
    ranges = _mapped_ranges(path)
    return bool(ranges) and all(any(a <= t.data_ptr() < b for a, b in ranges) for t in state.values())


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='needs Linux /proc/self/maps')
def test_zip_checkpoints_are_memory_mapped(tmp_path, lightning_checkpoint):
    want = _tensors(3)
    path = tmp_path / 'unet.pth'
    torch.save(want, path)
    got = weights.unet_state_dict(path)  # the weights_only reader
    _assert_same(got, want)
    assert _all_mapped(got, path), 'tensor data does not lie in a mapping of the file'

    lightning_path, _, lightning_want = lightning_checkpoint  # the restricted-unpickler reader
    got = weights.autoencoder_state_dict(lightning_path)
    _assert_same(got, lightning_want)
    assert _all_mapped(got, lightning_path)

    # Control: the check does tell an ordinary load apart.
    assert not _all_mapped(torch.load(path, weights_only=True), path)


def test_legacy_format_loads_without_mmap(tmp_path):
    want = _tensors(4)
    path = tmp_path / 'legacy.pth'
    torch.save(want, path, _use_new_zipfile_serialization=False)
    _assert_same(weights.unet_state_dict(path), want)


# -- errors name the file and the keys ---------------------------------------------------------

def test_missing_file_names_path(tmp_path):
    path = tmp_path / 'nowhere' / 'text2video_pytorch_model.pth'
    with pytest.raises(CheckpointError, match='not found') as error:
        weights.read_checkpoint(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize('layout', ['zip', 'legacy', 'lightning', 'safetensors'])
def test_truncated_file_names_path(tmp_path, layout, lightning_checkpoint):
    if layout == 'lightning':
        path = lightning_checkpoint[0]
    elif layout == 'safetensors':
        from safetensors.torch import save_file
        path = str(tmp_path / 'unet.safetensors')
        save_file(_tensors(), path)
    else:
        path = str(tmp_path / 'unet.pth')
        torch.save(_tensors(), path, _use_new_zipfile_serialization=layout == 'zip')
    weights.read_checkpoint(path)  # intact, it reads
    _truncate(path)
    with pytest.raises(CheckpointError, match='could not be read') as error:
        weights.read_checkpoint(path)
    assert path in str(error.value)


def _small_module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_load_strict_assigns_the_files_tensors():
    module = _small_module()
    state = {k: torch.randn(v.shape) for k, v in module.state_dict().items()}
    weights.load_strict(module, state, 'ckpt.pth')
    for k, v in module.state_dict().items():
        assert v.data_ptr() == state[k].data_ptr(), f'{k} was copied'


@pytest.mark.parametrize('problem', ['missing', 'unexpected', 'shape'])
def test_load_strict_names_file_keys_and_shapes(problem):
    module = _small_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {k: torch.randn(v.shape) for k, v in module.state_dict().items()}
    if problem == 'missing':
        del state['1.bias']
        expected = ['1 missing keys', "'1.bias'"]
    elif problem == 'unexpected':
        state['2.weight'] = torch.zeros(4)
        expected = ['1 unexpected keys', "'2.weight'"]
    else:
        state['0.weight'] = torch.zeros(4, 5)
        expected = ['1 shape mismatches', '0.weight', '(4, 5)', '(4, 3)']
    path = '/models/t2v/text2video_pytorch_model.pth'
    with pytest.raises(CheckpointError) as error:
        weights.load_strict(module, state, path)
    message = str(error.value)
    assert path in message and 'Sequential' in message
    for part in expected:
        assert part in message, (part, message)
    for k, v in module.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_load_strict_shows_only_the_first_keys():
    module = nn.Linear(2, 2)
    state = dict(module.state_dict(), **{f'extra.{i:02d}': torch.zeros(1) for i in range(12)})
    with pytest.raises(CheckpointError) as error:
        weights.load_strict(module, state, 'x.pth')
    message = str(error.value)
    assert '12 unexpected keys' in message
    shown = [f'extra.{i:02d}' for i in range(12) if f'extra.{i:02d}' in message]
    assert shown == [f'extra.{i:02d}' for i in range(weights.MAX_KEYS_SHOWN)]


def test_empty_networks_are_the_networks_on_meta_built_without_initialisers():
    calls = collections.Counter()

    class CountCalls(TorchFunctionMode):   # outside empty_networks' own mode: sees what that one lets through
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls[getattr(func, '__name__', str(func))] += 1
            return func(*args, **(kwargs or {}))

    with CountCalls():
        networks = weights.empty_networks(TINY)
    with torch.device('meta'):
        built = OpenCLIPTextEncoder(TINY.text), UNet3D(TINY.unet), AutoencoderKL(TINY.autoencoder)
    for network, plain in zip(networks, built):
        got, want = network.state_dict(keep_vars=True), plain.state_dict(keep_vars=True)
        assert list(got) == list(want)
        for k, v in want.items():
            assert (got[k].device.type, got[k].shape, got[k].dtype, type(got[k])) == ('meta', v.shape, v.dtype,
                                                                                       type(v)), k
    ran = {name: n for name, n in calls.items() if name.endswith('_') and not name.startswith('_')}
    assert calls['empty'] == sum(len(network.state_dict()) for network in built) and ran == {}, calls


def test_initialisers_are_skipped_only_inside_the_mode():
    tensor = torch.arange(6.0)
    with weights._SkipInitialisers():
        nn.init.kaiming_uniform_(tensor.view(2, 3))
        nn.init.normal_(tensor)
        assert tensor.uniform_() is tensor and tensor.fill_(7) is tensor and tensor.zero_() is tensor
        doubled = tensor * 2
    assert torch.equal(tensor, torch.arange(6.0)) and torch.equal(doubled, torch.arange(0.0, 12.0, 2))
    tensor.fill_(7)
    assert torch.equal(tensor, torch.full((6,), 7.0))


def test_placed_moves_a_module_only_where_a_tensor_is_elsewhere():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))   # its num_batches_tracked: an int64 buffer
    calls = collections.Counter()

    class CountCalls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls[getattr(func, '__name__', str(func))] += 1
            return func(*args, **(kwargs or {}))

    with CountCalls():
        same = weights.placed(module, torch.device('cpu'), torch.float32)
    assert same is module and calls['to'] == 0, calls
    half = weights.placed(module, torch.device('cpu'), torch.float16)
    assert {name: t.dtype for name, t in half.state_dict().items()} == {
        '0.weight': torch.float16, '0.bias': torch.float16, '1.weight': torch.float16, '1.bias': torch.float16,
        '1.running_mean': torch.float16, '1.running_var': torch.float16, '1.num_batches_tracked': torch.int64}
    with CountCalls():
        weights.placed(half, torch.device('cpu'), torch.float16)
    assert calls['to'] == 0, calls


# -- the text tower ----------------------------------------------------------------------------

def test_text_state_dict_drops_known_unused_keys(tiny_model_dir):
    path = os.path.join(tiny_model_dir, TINY.ckpt_clip)
    in_file = torch.load(path, weights_only=True)
    last = f'transformer.resblocks.{TINY.text.layers - 1}.'
    assert any(k.startswith(last) for k in in_file) and 'visual.class_embedding' in in_file
    got = weights.text_state_dict(path, *weights.text_key_rules(TINY))
    with torch.device('meta'):
        wanted_keys = set(OpenCLIPTextEncoder(TINY.text).state_dict())
    assert set(got) == wanted_keys
    dropped = set(in_file) - set(got)
    assert {'text_projection', 'logit_scale', 'visual.class_embedding'} <= dropped
    assert all(k.startswith(last) for k in dropped - {'text_projection', 'logit_scale', 'visual.class_embedding'})
    for k in got:
        assert torch.equal(got[k], in_file[k]), k


def test_text_state_dict_lists_stray_keys(tiny_model_dir, tmp_path):
    state = torch.load(os.path.join(tiny_model_dir, TINY.ckpt_clip), weights_only=True)
    state['transformer.resblocks.7.attn.in_proj_weight'] = torch.zeros(1)  # beyond the tower
    state['prompt_learner.ctx'] = torch.zeros(1)
    path = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        weights.text_state_dict(path, *weights.text_key_rules(TINY))
    message = str(error.value)
    assert str(path) in message
    assert 'transformer.resblocks.7.attn.in_proj_weight' in message and 'prompt_learner.ctx' in message
    assert 'token_embedding' not in message and 'visual.' not in message


# -- end to end on the tiny model dir --------------------------------------------------------------

def test_from_pretrained_loads_every_tensor_from_the_files(tiny_model_dir):
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    unet_file = torch.load(os.path.join(tiny_model_dir, TINY.ckpt_unet), weights_only=True)
    vae_file = torch.load(os.path.join(tiny_model_dir, TINY.ckpt_autoencoder), weights_only=True)['state_dict']
    clip_file = torch.load(os.path.join(tiny_model_dir, TINY.ckpt_clip), weights_only=True)
    for module, in_file in ((engine.unet, unet_file),
                            (engine.autoencoder, {k[len(AUTOENCODER_PREFIX):]: v for k, v in vae_file.items()
                                                  if k.startswith(AUTOENCODER_PREFIX)}),
                            (engine.text_encoder, clip_file)):
        state = module.state_dict()
        assert not any(v.is_meta for v in state.values())
        assert len(state) > 0 and set(state) <= set(in_file)
        for k, v in state.items():
            assert torch.equal(v, in_file[k]), k
    assert set(engine.unet.state_dict()) == set(unet_file)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / 'model')


def test_from_pretrained_truncated_autoencoder_names_it(model_copy):
    path = os.path.join(model_copy, TINY.ckpt_autoencoder)
    _truncate(path)
    with pytest.raises(CheckpointError, match='could not be read') as error:
        TextToVideo.from_pretrained(str(model_copy), device='cpu')
    assert path in str(error.value)


def test_from_pretrained_unet_missing_key_names_file_and_key(model_copy):
    path = os.path.join(model_copy, TINY.ckpt_unet)
    state = torch.load(path, weights_only=True)
    dropped = sorted(state)[3]
    del state[dropped]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match='1 missing keys') as error:
        TextToVideo.from_pretrained(str(model_copy), device='cpu')
    message = str(error.value)
    assert path in message and repr(dropped) in message and 'UNet3D' in message


# -- safetensors ---------------------------------------------------------------------------------

def test_safetensors_unet_is_read_and_loads(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file
    want = torch.load(os.path.join(tiny_model_dir, TINY.ckpt_unet), weights_only=True)
    path = str(tmp_path / 'text2video_pytorch_model.safetensors')
    save_file(want, path)
    got = weights.read_checkpoint(path)
    _assert_same(got, want)
    with torch.device('meta'):
        unet = UNet3D(TINY.unet)
    weights.load_strict(unet, weights.unet_state_dict(path), path)
    _assert_same(unet.state_dict(), want)
