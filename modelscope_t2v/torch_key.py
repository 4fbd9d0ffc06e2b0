"""Inductor's torch_key kept in the compile cache's folder, so that a later process need not compute it again.

Every artefact load (and every build) checks inductor's torch_key: a hash of the contents of all of torch's Python
sources, computed once a process: 1-1.9 s of a warm start's loader thread on an H100, while the weights load. A process
that has it writes it to `torch-key-STAMP.txt`, STAMP hashing the path, size and modification time of each of those
files (a stat each, not a read); a later process whose torch files have the same stamp sets it from there
(`torch_key.set`, which inductor's own compile workers use), where this torch has that.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from .artefact_builds import save_atomically

TORCH_FOLDER = os.path.dirname(torch.__file__)


def restore_torch_key(folder: str) -> bool:
    """Set inductor's torch_key from the file an earlier process wrote in `folder` for these torch files; whether
    it was set (not where there is no such file, or this torch cannot take it)."""
    torch_key = _inductor_torch_key()
    if not hasattr(torch_key, 'set'):
        return False
    try:
        with open(key_path(folder)) as f:
            key = bytes.fromhex(f.read().strip())
    except (OSError, ValueError):   # none written yet for these files, or damaged
        return False
    try:
        torch_key.set(key)
    except (AssertionError, RuntimeError):   # already computed in this process
        return False
    return True


def remember_torch_key(folder: str) -> None:
    """Write this process's torch_key to `folder` for a later process, where it is not there yet."""
    path = key_path(folder)
    if not os.path.exists(path):
        key = _inductor_torch_key()().hex()
        save_atomically(lambda temporary: Path(temporary).write_text(key + '\n'), path)


def key_path(folder: str) -> str:
    return os.path.join(folder, f'torch-key-{torch_files_stamp()}.txt')


@functools.lru_cache
def torch_files_stamp(root: str = TORCH_FOLDER) -> str:
    """A hash of the path, size and modification time of each Python file under torch's folder and of each file
    under torch/_inductor (what torch_key reads), and of torch's version: 2,400 stats, 0.05 s on the project's CPU."""
    digest = hashlib.sha256(torch.__version__.encode())
    inductor = os.path.join(root, '_inductor')
    for folder, folders, files in os.walk(root):
        folders[:] = sorted(name for name in folders if name != '__pycache__')
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith('.py') or path.startswith(inductor + os.sep):
                stat = os.stat(path)
                digest.update(f'{os.path.relpath(path, root)} {stat.st_size} {stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:32]


def _inductor_torch_key():
    from torch._inductor import codecache
    return codecache.torch_key
