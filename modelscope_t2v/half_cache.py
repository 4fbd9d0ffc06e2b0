"""A half-precision safetensors cache of a model dir's three networks, for start-up in seconds.

The originals are float32 pickles (text2video_pytorch_model.pth 5.6 GB, open_clip_pytorch_model.bin
3.9 GB of which only the text tower is used, VQGAN_autoencoder.pth a whole training checkpoint).
Reading them means unzipping and unpickling, then converting every tensor to half precision on its
way to the GPU. The cache holds, once converted, exactly the keys each network loads: half the bytes
(3.5 GB for the real shapes, against 7.4 GB of float32 actually read), no unpickling (a JSON header
and raw tensors), and a read memory-maps the file (`_read_tensors`), so the tensors are not copied on the
CPU: the pages go from the page cache into the copy to the GPU. A cold start is then bound by the disk.

Layout: `<root>/<model dir name>-<dtype>-<16 hex digits>/{text_encoder,unet,autoencoder}.safetensors`
and `manifest.json`, root `cache_dir`, else `$MODELSCOPE_T2V_CACHE`, else `~/.cache/modelscope_t2v`.
The digits hash everything the files depend on (see `_cache_folder`), so a changed source file or
configuration gets a new folder; writing it removes the folders it supersedes (`_remove_superseded`).
An engine on a GPU does not wait for the writing (write_behind): its first generation, which starts a cold
compile cache's builds, runs meanwhile.

Integrity. The manifest records, when the cache is written, the size and xxh3-128 hash of every
cache file, and a sampled hash of every source file (`_source_sample`). Each start verifies them
all before any tensor is used; on a mismatch it warns, naming the file, and rebuilds the cache
from the originals. xxh3 is not cryptographic, and need not be: the threat is damage (a bad disk,
an interrupted copy, flipped bits), not an adversary, who could as well edit the originals. It
is fast: 28 GB/s over a memory-mapped 2.8 GB file (the real UNet's size) in the page cache, on one
core of this project's 2-core AMD EPYC development machine, where hashlib's blake2b reads 0.85 GB/s
and sha256 1.45 GB/s. At that rate the 3.5 GB of the real networks' fp16 cache take 0.13 s to
verify, against the 3 s start-up budget (blake2b: 4 s). A cold start is bound by the disk either
way: the hash pass brings in the pages that loading then reads from memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import stat
import threading

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import model_folder, scratch, weights
from .config import ModelConfig
from .model_folder import ModelFolder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2            # bump when what the files hold changes: old caches are then ignored
CACHE_ENV = 'MODELSCOPE_T2V_CACHE'
DEFAULT_CACHE_ROOT = os.path.join('~', '.cache', 'modelscope_t2v')
HALF_DTYPES = (torch.float16, torch.bfloat16)
SAFETENSORS_DTYPES = {'F16': torch.float16, 'BF16': torch.bfloat16}   # their names in a file's header
NETWORK_FILES = ('text_encoder.safetensors', 'unet.safetensors', 'autoencoder.safetensors')  # load_networks' order
MANIFEST = 'manifest.json'    # written last: its hashes of the files above and of the sources
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 1 << 20   # _source_sample reads 16 MiB of each source file
_writers: list = []   # the threads writing caches behind (load_networks_cached's write_behind)


def load_networks_cached(folder: ModelFolder, dtype: torch.dtype, cache_dir: str | None = None,
                         write_behind: bool = False, devices=None):
    """(text encoder, UNet, autoencoder) in `dtype`, from a safetensors cache of the model folder's weights;
    built from the originals (model_folder.load_networks) and written on the first call.

    A cache read puts each network's tensors on its device in `devices` (default: all three on the CPU, where
    they stay memory-mapped); the first call returns them on the CPU.

    With `write_behind` that first call returns before the cache is written, which a thread of its own does
    meanwhile (wait_for_writes() joins it; the process's exit waits for it): for a caller that copies the
    networks elsewhere (to a GPU) and leaves the CPU tensors returned as they are. What it writes is the
    networks' tensors as returned, whatever the caller then assigns to their parameters."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f'dtype={dtype} cannot be cached: the weight cache holds one of '
                         f'{[str(d) for d in HALF_DTYPES]}; load float32 with model_folder.load_networks')
    cache = _cache_folder(folder, dtype, cache_dir)
    sources = _source_samples(folder)   # before reading them: a change while converting shows next time
    if os.path.isdir(cache):
        networks = _read(cache, folder.config, sources, devices or (torch.device('cpu'),) * len(NETWORK_FILES))
        if networks is not None:
            logger.info('weights of %s read from the %s cache %s', folder.path, dtype, cache)
            return networks  # the files hold `dtype`
    logger.info('converting the weights of %s to %s (once); caching them in %s', folder.path, dtype, cache)
    networks = tuple(net.to(dtype) for net in model_folder.load_networks(folder))
    states = [net.state_dict() for net in networks]   # the tensors now, before the caller moves the networks
    if write_behind:
        writer = threading.Thread(target=_write, args=(cache, states, folder.path, sources),
                                  name='modelscope-t2v-half-cache')
        writer.start()
        _writers[:] = [other for other in _writers if other.is_alive()] + [writer]
    else:
        _write(cache, states, folder.path, sources)
    return networks


def wait_for_writes() -> None:
    """Wait for the caches being written behind (load_networks_cached's write_behind)."""
    while _writers:
        _writers.pop().join()


def _cache_folder(folder: ModelFolder, dtype: torch.dtype, cache_dir: str | None) -> str:
    """`<root>/<model dir name>-<dtype>-<hash>`; the hash covers all that the cached tensors depend on."""
    root = os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT)
    model_dir = os.path.abspath(folder.path)
    key = {
        'format': FORMAT_VERSION,
        'model_dir': model_dir,
        'layout': folder.layout,
        # (size, mtime in ns) per source file: rewriting or touching one invalidates the cache
        'sources': {os.path.abspath(path): _stamp(path) for files in folder.weights for path in files},
        'config': repr(folder.config),  # the shapes built, from the folder's configuration file(s)
        'dtype': str(dtype),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(model_dir.rstrip(os.sep)))[:40]
    return os.path.join(root, f'{name}-{str(dtype).removeprefix("torch.")}-{digest}')


def _stamp(path: str):
    """(size, mtime_ns), or None for a missing file (model_folder.open_folder then says which)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def _source_samples(folder: ModelFolder) -> dict:
    """{source file: _source_sample} for every weight file of the model folder."""
    return {os.path.abspath(path): _source_sample(path) for files in folder.weights for path in files}


def _source_sample(path: str) -> str | None:
    """xxh3-128 of 16 blocks of 1 MiB spread evenly over the file, the first and the last included (the whole
    file when smaller); None for a missing file.

    Beside the size and mtime in the folder's key, this tells a source rewritten with the same size and
    mtime (a copy that keeps timestamps, an os.utime) from the file the cache was made of: another
    checkpoint differs in every block, and a torch zip checkpoint's last MiB holds the central directory
    with every tensor's CRC-32, so there any change shows. It reads 16 MiB, not the 5-10 GB a full hash of
    the originals would read at every start (which the cache exists to avoid). Inode and ctime are left
    out: they change while the bytes do not (overlayfs copy-up, FUSE stores that number inodes per mount,
    chmod), and each false alarm costs a full conversion.
    """
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            digest = xxhash.xxh3_128()
            if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
                digest.update(f.read())
                return digest.hexdigest()
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BLOCK_BYTES))
            return digest.hexdigest()
    except OSError:
        return None


def _file_hash(path: str) -> str:
    """xxh3-128 of a whole file, memory-mapped (no copy: 28 GB/s in the page cache, see the module's docstring)."""
    with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return xxhash.xxh3_128(data).hexdigest()


def _damage(folder: str, sources: dict) -> str | None:
    """Why the folder's files cannot be trusted (naming the file), or None when they match its manifest."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        return f'{MANIFEST} unreadable ({error})'
    for name, sample in sources.items():
        if manifest.get('sources', {}).get(name) != sample:
            return f'source {name} changed since the cache was made of it (same size and mtime, other bytes)'
    for file in NETWORK_FILES:
        recorded, path = manifest.get('files', {}).get(file, {}), os.path.join(folder, file)
        try:
            if os.path.getsize(path) != recorded.get('bytes') or _file_hash(path) != recorded.get('xxh3_128'):
                return f'{file} differs from the file written (damaged)'
        except (OSError, ValueError) as error:   # mmap refuses an empty file with ValueError
            return f'{file} unreadable ({error})'
    return None


def _read(folder: str, config: ModelConfig, sources: dict, devices):
    """The three networks holding the folder's tensors on their `devices`, or None (folder deleted) if unusable."""
    damage = _damage(folder, sources)
    if damage is not None:
        logger.warning('weight cache %s is unusable (%s); deleting it and rebuilding from the originals', folder,
                       damage)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    networks = weights.empty_networks(config)   # the files supply every tensor
    try:
        for net, file, device in zip(networks, NETWORK_FILES, devices):
            path = os.path.join(folder, file)
            weights.load_strict(net, _read_tensors(path, torch.device(device)), path)
    except (OSError, ValueError, KeyError) as error:
        # truncated (e.g. the disk filled after the rename), deleted, a header not safetensors' (JSON's
        # ValueError, a missing key) or not these networks (weights.CheckpointError, a ValueError)
        logger.warning('weight cache %s is unusable (%s); deleting it and rebuilding from the originals',
                       folder, error)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return networks


def _read_tensors(path: str, device: torch.device) -> dict:
    """{key: tensor} of a safetensors file of one half-precision dtype, each tensor a view of the file's
    memory-mapped data (copy-on-write: writing a tensor leaves the file as it is), copied to `device`.

    One torch call a tensor, and one more to copy it, where safetensors' load_file makes three a tensor and
    Module.to two more: each call gives up the GIL (weights.empty_networks says why that matters)."""
    with open(path, 'rb') as f:
        header_bytes = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(header_bytes))
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop('__metadata__', None)
    kinds = {entry['dtype'] for entry in header.values()}
    if len(kinds) != 1 or next(iter(kinds)) not in SAFETENSORS_DTYPES:
        raise weights.CheckpointError(f'{path} holds {sorted(kinds)}, not one of {sorted(SAFETENSORS_DTYPES)}')
    dtype = SAFETENSORS_DTYPES[kinds.pop()]
    size = dtype.itemsize
    data_bytes = len(data) - 8 - header_bytes
    if data_bytes % size:
        raise weights.CheckpointError(f'{path}: its data is not a whole number of {dtype} values')
    flat = torch.frombuffer(data, dtype=dtype, offset=8 + header_bytes)   # (the file's values,)
    tensors = {}
    for key, entry in header.items():
        (begin, end), shape = entry['data_offsets'], entry['shape']
        if begin % size or end - begin != math.prod(shape) * size or end > data_bytes:
            raise weights.CheckpointError(f'{path}: {key} at bytes {begin}-{end} is not a {dtype} tensor of '
                                          f'shape {shape} within the file')
        tensor = torch.as_strided(flat, shape, _contiguous_strides(shape), begin // size)
        tensors[key] = tensor if device.type == 'cpu' else tensor.to(device)
    return tensors


def _contiguous_strides(shape) -> list:
    """The strides of a contiguous tensor of this shape."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return strides


def _write(folder: str, states, model_dir: str, sources: dict) -> None:
    """Write the networks' state dicts (NETWORK_FILES' order) and the manifest into a temporary sibling, then
    rename it to `folder` atomically.

    Failure only logs: the cache is an optimisation, and the caller already holds the networks.
    """
    root = os.path.dirname(folder)
    temp = None
    try:
        # as readable as the model dir, no more: mkdtemp and save_file alone give 0o700 and 0o600,
        # which would hide a shared cache from every other user
        mode = stat.S_IMODE(os.stat(model_dir).st_mode) & 0o777
        os.makedirs(root, exist_ok=True)
        temp = scratch.temporary_sibling(folder)   # removes those of writers killed before
        files = {}
        for state, file in zip(states, NETWORK_FILES):
            path = os.path.join(temp, file)
            # only the keys the network loads; safetensors wants contiguous tensors
            save_file({k: v.contiguous() for k, v in state.items()}, path)
            files[file] = {'bytes': os.path.getsize(path), 'xxh3_128': _file_hash(path)}
        with open(os.path.join(temp, MANIFEST), 'w') as f:
            json.dump({'format': FORMAT_VERSION, 'files': files, 'sources': sources}, f, indent=1)
        for file in (*NETWORK_FILES, MANIFEST):
            os.chmod(os.path.join(temp, file), mode & 0o666)
            _fsync(os.path.join(temp, file))  # data on disk before the rename makes it visible
        os.chmod(temp, mode)
        os.rename(temp, folder)  # atomic; refused when a concurrent writer's folder is already there
        _remove_superseded(folder, sources)
    except (OSError, SafetensorError) as error:
        if os.path.isdir(folder) and temp is not None:
            logger.debug('weight cache %s was written meanwhile by another process; ours discarded', folder)
        else:
            logger.warning('could not write the weight cache %s (%s); the networks come from the originals '
                           'and the next start converts them again', folder, error)
    finally:
        if temp is not None and os.path.isdir(temp):
            shutil.rmtree(temp, ignore_errors=True)


def _remove_superseded(folder: str, sources: dict) -> None:
    """Remove the caches that `folder` replaces: those of the same dtype over the same source files (their
    manifests name the same paths), written before the files or the configuration changed. Nothing would
    read them again, and each holds gigabytes. A process still reading one keeps its memory-mapped pages."""
    root, name = os.path.split(folder)
    same_kind = re.compile(re.escape(name[:-16]) + '[0-9a-f]{16}')   # '<model dir name>-<dtype>-' + hash
    for other in os.listdir(root):
        if other == name or not same_kind.fullmatch(other):
            continue
        try:
            with open(os.path.join(root, other, MANIFEST)) as f:
                superseded = set(json.load(f).get('sources', {})) == set(sources)
        except (OSError, ValueError, AttributeError):
            continue   # not a cache this code wrote: left alone
        if superseded:
            logger.info('removing the weight cache %s: %s replaces it', os.path.join(root, other), folder)
            shutil.rmtree(os.path.join(root, other), ignore_errors=True)


def _fsync(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())
