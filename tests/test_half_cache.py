"""half_cache.py: written once, then read bit for bit; invalidation, integrity, atomicity, failures that only log."""

import json
import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v import config as config_lib
from modelscope_t2v import half_cache, model_folder, weights
from modelscope_t2v.half_cache import load_networks_cached
from modelscope_t2v.model_folder import open_folder

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py
TENSOR_FILES = ['autoencoder.safetensors', 'text_encoder.safetensors', 'unet.safetensors']
FILES = sorted(TENSOR_FILES + ['manifest.json'])
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16}  # view as integers: compare bits, not values


@pytest.fixture(scope='module')
def config(tiny_model_dir):
    return config_lib.load(tiny_model_dir)


@pytest.fixture(scope='module')
def originals(tiny_model_dir, config):
    """The float32 networks read from the original files."""
    return model_folder.load_networks(open_folder(tiny_model_dir))


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A private copy of the tiny model dir, for tests that change its files."""
    return shutil.copytree(tiny_model_dir, tmp_path / 'model')


@pytest.fixture
def count_builds(monkeypatch):
    """Counts the calls of model_folder.load_networks (reads of the originals)."""
    calls = []
    real = model_folder.load_networks

    def counted(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(model_folder, 'load_networks', counted)
    return calls


def _forbid_builds(monkeypatch):
    def refuse(*args):
        raise AssertionError('read the original files although the cache should have served')
    monkeypatch.setattr(model_folder, 'load_networks', refuse)


def _assert_converted(networks, originals, dtype) -> int:
    """Every parameter and buffer equals, bit for bit, the float32 original's `.to(dtype)`; returns the count."""
    compared = 0
    for net, original in zip(networks, originals):
        got = dict(net.named_parameters()) | dict(net.named_buffers())
        want = dict(original.named_parameters()) | dict(original.named_buffers())
        assert sorted(got) == sorted(want), type(net).__name__
        for name, tensor in want.items():
            assert got[name].dtype == dtype and got[name].device.type == 'cpu', (name, got[name].dtype)
            expected = tensor.detach().to(dtype)
            assert torch.equal(got[name].detach().view(BITS[dtype]), expected.view(BITS[dtype])), name
            compared += 1
    return compared


def _folders(root) -> list:
    return sorted(os.listdir(root))


def test_a_cache_written_behind_holds_the_tensors_returned(tiny_model_dir, originals, tmp_path, monkeypatch):
    """With write_behind the first call returns before the cache is written, and the cache holds the tensors it
    returned although the caller then gives the networks others (as moving them to a GPU does)."""
    go, write = threading.Event(), half_cache._write
    monkeypatch.setattr(half_cache, '_write', lambda *args: (go.wait(10), write(*args)))
    root = tmp_path / 'cache'
    networks = load_networks_cached(open_folder(tiny_model_dir), torch.float16, str(root), write_behind=True)
    assert not root.exists()
    for net in networks:
        for tensor in [*net.parameters(), *net.buffers()]:
            tensor.data = torch.zeros_like(tensor)
    go.set()
    half_cache.wait_for_writes()
    _forbid_builds(monkeypatch)
    read = load_networks_cached(open_folder(tiny_model_dir), torch.float16, str(root))
    assert _assert_converted(read, originals, torch.float16) == sum(len(net.state_dict()) for net in originals)


def test_an_engine_on_the_cpu_writes_its_cache_before_using_the_networks(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr('modelscope_t2v.text_to_video.load_networks_cached',
                        lambda *args, write_behind, devices: seen.append(write_behind) or load_networks_cached(*args))
    TextToVideo.from_pretrained(tiny_model_dir, device='cpu', dtype=torch.float16, half_cache=str(tmp_path))
    assert seen == [False]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_first_call_writes_three_files_second_call_reads_them(tiny_model_dir, config, originals, tmp_path,
                                                            monkeypatch, count_builds, dtype):
    first = load_networks_cached(open_folder(tiny_model_dir), dtype, cache_dir=str(tmp_path))
    assert len(count_builds) == 1
    [folder] = _folders(tmp_path)  # no temporary folder left beside it
    assert folder.startswith('tiny-original') and str(dtype).split('.')[1] in folder
    assert sorted(os.listdir(tmp_path / folder)) == FILES
    n = sum(len(net.state_dict()) for net in originals)  # 28 + 622 + 176 tensors in the tiny model
    assert _assert_converted(first, originals, dtype) == n

    _forbid_builds(monkeypatch)
    second = load_networks_cached(open_folder(tiny_model_dir), dtype, cache_dir=str(tmp_path))
    assert _assert_converted(second, originals, dtype) == n
    assert [type(net) for net in second] == [type(net) for net in originals]
    assert _folders(tmp_path) == [folder]


def test_a_read_puts_each_network_on_its_device(tiny_model_dir, originals, tmp_path, monkeypatch):
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, str(tmp_path))
    _forbid_builds(monkeypatch)
    text, unet, autoencoder = load_networks_cached(open_folder(tiny_model_dir), torch.float16, str(tmp_path),
                                                   devices=('meta', 'cpu', 'meta'))
    assert {t.device.type for net in (text, autoencoder) for t in net.state_dict().values()} == {'meta'}
    assert _assert_converted([unet], [originals[1]], torch.float16) == len(originals[1].state_dict())


def test_tensors_read_are_copy_on_write_views_of_the_file(tiny_model_dir, originals, tmp_path):
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, str(tmp_path))
    [folder] = _folders(tmp_path)
    path = str(tmp_path / folder / 'unet.safetensors')
    tensors = half_cache._read_tensors(path, torch.device('cpu'))
    want = {k: v.detach().to(torch.float16) for k, v in originals[1].state_dict().items()}
    assert sorted(tensors) == sorted(want)
    for k, v in want.items():
        assert tensors[k].is_contiguous() and torch.equal(tensors[k].view(torch.int16), v.view(torch.int16)), k
    first = next(iter(tensors))
    tensors[first].add_(1)   # in this process's pages only
    assert torch.equal(load_file(path)[first].view(torch.int16), want[first].view(torch.int16))


def test_a_file_of_mixed_dtypes_is_refused_naming_them(tmp_path):
    path = str(tmp_path / 'mixed.safetensors')
    save_file({'a': torch.zeros(2, dtype=torch.float16), 'b': torch.zeros(2)}, path)
    with pytest.raises(weights.CheckpointError, match=r"mixed.safetensors holds \['F16', 'F32'\]"):
        half_cache._read_tensors(path, torch.device('cpu'))


def test_files_hold_only_the_networks_keys(tiny_model_dir, config, originals, tmp_path):
    from safetensors import safe_open
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    [folder] = _folders(tmp_path)
    for file, original in zip(['text_encoder.safetensors', 'unet.safetensors', 'autoencoder.safetensors'], originals):
        with safe_open(str(tmp_path / folder / file), framework='pt') as f:
            keys = sorted(f.keys())
        assert keys == sorted(original.state_dict()), file  # no last text block, no first_stage_model. prefix
    size = sum(os.path.getsize(tmp_path / folder / f) for f in TENSOR_FILES)
    n_values = sum(t.numel() for net in originals for t in net.state_dict().values())
    assert 2 * n_values < size < 2 * n_values + 200_000  # 2 bytes a value plus the JSON headers


def test_touching_a_source_file_gives_a_new_folder_a_rebuild_and_removes_the_old(model_dir, config, tmp_path,
                                                                                    count_builds):
    """The superseded cache (same sources, same dtype) goes when its successor is written; others stay."""
    cache = tmp_path / 'cache'
    load_networks_cached(open_folder(str(model_dir)), torch.float16, cache_dir=str(cache))
    load_networks_cached(open_folder(str(model_dir)), torch.bfloat16, cache_dir=str(cache))   # another dtype
    [old] = [name for name in _folders(cache) if '-float16-' in name]
    [bfloat16] = [name for name in _folders(cache) if '-bfloat16-' in name]

    # rewrite the UNet with one tensor doubled, then give it a new mtime
    unet_path = model_dir / config.ckpt_unet
    state = torch.load(unet_path, weights_only=True)
    name = next(iter(state))
    state[name] = state[name] * 2
    torch.save(state, unet_path)
    stat = os.stat(unet_path)
    os.utime(unet_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    networks = load_networks_cached(open_folder(str(model_dir)), torch.float16, cache_dir=str(cache))
    assert len(count_builds) == 3
    [new] = [name for name in _folders(cache) if '-float16-' in name]
    assert new != old and _folders(cache) == sorted([new, bfloat16])
    assert torch.equal(networks[1].state_dict()[name], state[name].to(torch.float16))

    os.utime(unet_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # a touch alone
    load_networks_cached(open_folder(str(model_dir)), torch.float16, cache_dir=str(cache))
    assert len(count_builds) == 4 and len(_folders(cache)) == 2 and new not in _folders(cache)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.int8])
def test_a_dtype_other_than_half_is_refused(tiny_model_dir, config, tmp_path, dtype):
    with pytest.raises(ValueError, match=rf"{dtype}.*torch.float16.*torch.bfloat16"):
        load_networks_cached(open_folder(tiny_model_dir), dtype, cache_dir=str(tmp_path / 'cache'))
    assert not (tmp_path / 'cache').exists()


def test_unwritable_cache_dir_warns_and_still_returns_the_networks(tiny_model_dir, config, originals, tmp_path,
                                                                   caplog):
    (tmp_path / 'a_file').write_text('not a folder')
    cache = tmp_path / 'a_file' / 'cache'  # cannot be created: its parent is a regular file
    with caplog.at_level(logging.WARNING, logger=half_cache.__name__):
        networks = load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(cache))
    assert _assert_converted(networks, originals, torch.float16) == sum(len(n.state_dict()) for n in originals)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 'could not write the weight cache' in warnings[0].getMessage()
    assert _folders(tmp_path) == ['a_file']


def test_a_corrupt_cache_file_is_detected_and_rebuilt(tiny_model_dir, config, originals, tmp_path, monkeypatch,
                                                      count_builds, caplog):
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    [folder] = _folders(tmp_path)
    unet_file = tmp_path / folder / 'unet.safetensors'
    size = unet_file.stat().st_size
    with open(unet_file, 'r+b') as f:
        f.truncate(size // 2)

    with caplog.at_level(logging.WARNING, logger=half_cache.__name__):
        networks = load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    assert len(count_builds) == 2
    assert sum('is unusable' in r.getMessage() for r in caplog.records) == 1
    n = sum(len(net.state_dict()) for net in originals)
    assert _assert_converted(networks, originals, torch.float16) == n
    assert _folders(tmp_path) == [folder] and unet_file.stat().st_size == size  # rewritten whole

    _forbid_builds(monkeypatch)
    again = load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    assert _assert_converted(again, originals, torch.float16) == n


@pytest.mark.parametrize('header, data', [(b'not json', b''), (b'{"w": {"shape": [2]}}', b''),
                                          (b'{"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}', b'1234')])
def test_a_cache_file_whose_header_is_not_safetensors_is_rebuilt(tiny_model_dir, originals, tmp_path, count_builds,
                                                                 caplog, header, data):
    # the manifest records the file as written, so only the read itself can find it unusable
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    [folder] = _folders(tmp_path)
    unet_file = tmp_path / folder / 'unet.safetensors'
    unet_file.write_bytes(len(header).to_bytes(8, 'little') + header + data)   # the last: 8 bytes named, 4 there
    manifest = json.loads((tmp_path / folder / 'manifest.json').read_text())
    manifest['files']['unet.safetensors'] = {'bytes': unet_file.stat().st_size,
                                             'xxh3_128': half_cache._file_hash(str(unet_file))}
    (tmp_path / folder / 'manifest.json').write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger=half_cache.__name__):
        networks = load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    assert len(count_builds) == 2 and sum('is unusable' in r.getMessage() for r in caplog.records) == 1
    assert _assert_converted(networks, originals, torch.float16) == sum(len(n.state_dict()) for n in originals)


def test_a_concurrent_writer_s_folder_wins(tiny_model_dir, config, originals, tmp_path, monkeypatch):
    """A folder that appears while we write is kept; ours is discarded, no temporary folder remains."""
    real_rename = os.rename

    def rename_after_another_writer(src, dst):
        os.makedirs(dst)
        (open(os.path.join(dst, 'theirs'), 'w')).close()  # non-empty: the rename is refused
        return real_rename(src, dst)
    monkeypatch.setattr(half_cache.os, 'rename', rename_after_another_writer)
    networks = load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    assert _assert_converted(networks, originals, torch.float16) == sum(len(n.state_dict()) for n in originals)
    [folder] = _folders(tmp_path)
    assert os.listdir(tmp_path / folder) == ['theirs']


def test_cache_root_from_the_environment_then_home(tiny_model_dir, config, tmp_path, monkeypatch):
    monkeypatch.setenv(half_cache.CACHE_ENV, str(tmp_path / 'env'))
    load_networks_cached(open_folder(tiny_model_dir), torch.float16)
    [folder] = _folders(tmp_path / 'env')
    assert sorted(os.listdir(tmp_path / 'env' / folder)) == FILES

    monkeypatch.delenv(half_cache.CACHE_ENV)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    load_networks_cached(open_folder(tiny_model_dir), torch.float16)
    assert _folders(tmp_path / 'home' / '.cache' / 'modelscope_t2v') == [folder]  # same key, other root

    monkeypatch.setenv(half_cache.CACHE_ENV, str(tmp_path / 'env2'))
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path / 'given'))
    assert _folders(tmp_path / 'given') == [folder]  # an argument beats the environment
    assert not (tmp_path / 'env2').exists()


@pytest.mark.parametrize('dir_mode', [0o755, 0o700])
def test_cache_is_as_readable_as_the_model_dir(model_dir, config, tmp_path, dir_mode):
    """safetensors writes 0o600 and mkdtemp 0o700; the cache takes the model dir's mode instead."""
    os.chmod(model_dir, dir_mode)
    load_networks_cached(open_folder(str(model_dir)), torch.float16, cache_dir=str(tmp_path / 'cache'))
    [folder] = _folders(tmp_path / 'cache')
    assert os.stat(tmp_path / 'cache' / folder).st_mode & 0o777 == dir_mode
    assert {os.stat(tmp_path / 'cache' / folder / f).st_mode & 0o777 for f in FILES} == {dir_mode & 0o666}


# --- integrity: damaged cache files and sources rewritten under the same size and mtime ----------------------

def _video(engine) -> np.ndarray:
    request = parse_request({'text': 'a panda', 'seed': 3}, engine.config, output_type='frames', height=16, width=16,
                            num_frames=2, num_inference_steps=2)
    return engine(request).frames[0]


def test_flipped_bytes_in_a_cache_file_warn_and_the_video_equals_the_originals(tiny_model_dir, config, tmp_path,
                                                                                count_builds, caplog):
    half = {'device': 'cpu', 'dtype': torch.float16}
    expected = _video(TextToVideo.from_pretrained(tiny_model_dir, **half))   # the original files, no cache
    assert np.array_equal(_video(TextToVideo.from_pretrained(tiny_model_dir, half_cache=str(tmp_path), **half)),
                          expected)
    [folder] = _folders(tmp_path)
    unet_file = tmp_path / folder / 'unet.safetensors'
    before = {k: v.clone() for k, v in load_file(str(unet_file)).items()}   # the file is memory-mapped
    with open(unet_file, 'r+b') as f:   # 4096 bytes inside the tensor data, past the JSON header
        f.seek(unet_file.stat().st_size // 2)
        data = f.read(4096)
        f.seek(-4096, os.SEEK_CUR)
        f.write(bytes(b ^ 0x5A for b in data))
    after = load_file(str(unet_file))   # safetensors itself notices nothing: 2048 float16 values changed
    assert sum(int((before[k].view(torch.int16) != after[k].view(torch.int16)).sum()) for k in before) == 2048

    with caplog.at_level(logging.WARNING, logger=half_cache.__name__):
        engine = TextToVideo.from_pretrained(tiny_model_dir, half_cache=str(tmp_path), **half)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 'unet.safetensors differs from the file written (damaged)' in warning
    assert len(count_builds) == 3   # the reference, the first cache, the rebuild
    assert np.array_equal(_video(engine), expected)
    rewritten = load_file(str(unet_file))
    assert all(torch.equal(rewritten[k].view(torch.int16), v.view(torch.int16)) for k, v in before.items())


def test_a_source_rewritten_with_the_same_size_and_mtime_rebuilds_the_cache(model_dir, config, tmp_path,
                                                                           count_builds, caplog):
    cache = tmp_path / 'cache'
    load_networks_cached(open_folder(str(model_dir)), torch.float16, cache_dir=str(cache))
    [folder] = _folders(cache)

    unet_path = model_dir / config.ckpt_unet
    stat = os.stat(unet_path)
    state = torch.load(unet_path, weights_only=True)
    name = next(iter(state))
    state[name] = state[name] * 2
    torch.save(state, unet_path)
    os.utime(unet_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # same size and mtime as before
    assert (os.stat(unet_path).st_size, os.stat(unet_path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    with caplog.at_level(logging.WARNING, logger=half_cache.__name__):
        networks = load_networks_cached(open_folder(str(model_dir)), torch.float16, cache_dir=str(cache))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f'{config.ckpt_unet} changed since the cache was made of it' in warning
    assert len(count_builds) == 2 and _folders(cache) == [folder]   # rebuilt in place
    assert torch.equal(networks[1].state_dict()[name], state[name].to(torch.float16))


def test_a_missing_manifest_rebuilds_the_cache(tiny_model_dir, config, tmp_path, count_builds, caplog):
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    [folder] = _folders(tmp_path)
    os.remove(tmp_path / folder / 'manifest.json')   # e.g. a copy that left it out
    with caplog.at_level(logging.WARNING, logger=half_cache.__name__):
        load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    assert len(count_builds) == 2 and sorted(os.listdir(tmp_path / folder)) == FILES
    assert sum('manifest.json unreadable' in r.getMessage() for r in caplog.records) == 1


def test_source_sample_reads_16_blocks_first_and_last_included(tmp_path):
    """Of a 64 MiB file, 16 blocks of 1 MiB, 3.2 MiB apart: a change inside one shows, one between two does not."""
    path = tmp_path / 'big.pth'
    with open(path, 'wb') as f:
        f.truncate(64 << 20)
    original = half_cache._source_sample(str(path))

    def changed_at(offset) -> bool:
        with open(path, 'r+b') as f:
            f.seek(offset)
            f.write(b'\x01')
        sample = half_cache._source_sample(str(path))
        with open(path, 'r+b') as f:
            f.seek(offset)
            f.write(b'\x00')
        assert half_cache._source_sample(str(path)) == original
        return sample != original
    stride = ((64 << 20) - (1 << 20)) // 15
    assert [changed_at(o) for o in (0, (64 << 20) - 1, 7 * stride + 5, 7 * stride + (1 << 20) + 5)] == [
        True, True, True, False]
    assert half_cache._source_sample(str(tmp_path / 'missing.pth')) is None


def test_stale_temporary_folders_of_killed_writers_are_removed_at_the_next_write(tiny_model_dir, tmp_path):
    """A writer killed while writing leaves '.NAME.tmp-XXXXXXXX'; the next cache write into the root removes
    those unmodified for an hour (scratch.STALE_AFTER_S), and keeps a younger one: it may be a live writer's."""
    now = time.time()
    ages = {'.tiny-original-float16-0123456789abcdef.tmp-k1ll3d_a': 7200,   # killed two hours ago
            '.other-model-float16-fedcba9876543210.tmp-xyz_0123': 3700,
            '.tiny-original-float16-0123456789abcdef.tmp-writing1': 30}   # being written now, elsewhere
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'unet.safetensors').write_bytes(b'half a tensor')
        for path in (tmp_path / name / 'unet.safetensors', tmp_path / name):
            os.utime(path, (now - age, now - age))
    load_networks_cached(open_folder(tiny_model_dir), torch.float16, cache_dir=str(tmp_path))
    left = _folders(tmp_path)
    assert len(left) == 2 and '.tiny-original-float16-0123456789abcdef.tmp-writing1' in left
    assert '-float16-' in [name for name in left if not name.startswith('.')][0]   # the new cache
