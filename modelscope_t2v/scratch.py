"""The package's own temporary files and folders: each written beside its target, then renamed into place.

Their writer removes them when it fails; this module does it without masking that failure. A writer killed
with SIGKILL (or a lost machine) cannot, so the next writer into the same folder removes what is stale.

Stale means unmodified for STALE_AFTER_S (an hour), not "its writer's process is gone": batch jobs on
several nodes share --out, and caches may be shared, where a process id names a process of another host;
an age needs no lock and no record of the writer. A live writer modifies its file every few seconds (ffmpeg
appends each encoded packet; safetensors writes tensor after tensor), so an hour never takes one that is
still being written, and a file created a moment ago is never taken.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time

logger = logging.getLogger(__name__)

STALE_AFTER_S = 3600
# temporary_sibling's folders: '.NAME.tmp-' and mkdtemp's 8 characters
TEMPORARY_FOLDER_RE = re.compile(r'\..+\.tmp-[a-z0-9_]{8}', re.DOTALL)
_swept = set()                 # (folder, pattern) already swept by this process
_swept_lock = threading.Lock()


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file or folder of ours on a failure path. An error is logged, not raised: raised from an
    except block it would replace the failure being handled (a read-only folder refuses even the removal
    of a file that was never created)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning('could not remove the temporary %s: %s', os.fspath(path), error)


def last_modified(path: str) -> float:
    """The newest mtime of `path` and, for a folder, of the entries in it."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as entries:
            for entry in entries:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove_stale(folder: str | os.PathLike, pattern: re.Pattern, once: bool = False) -> list:
    """Remove the entries of `folder` whose name `pattern` matches (fully) and that have not been modified
    for STALE_AFTER_S; their paths. `once`: only at the first call for this folder and pattern in this
    process (a stale file comes from a writer that died before; listing a folder of 100 000 videos for
    each of them would cost more than the videos). Errors are logged: cleaning never stops a write."""
    folder = os.path.abspath(folder)
    if once:
        with _swept_lock:
            if (folder, pattern.pattern) in _swept:
                return []
            _swept.add((folder, pattern.pattern))
    removed, now = [], time.time()
    try:
        names = [name for name in os.listdir(folder) if pattern.fullmatch(name)]
    except OSError as error:
        logger.debug('cannot list %s for stale temporary files: %s', folder, error)
        return removed
    for name in names:
        path = os.path.join(folder, name)
        try:
            if now - last_modified(path) < STALE_AFTER_S:
                continue   # a live writer's, or one that died less than an hour ago
        except OSError:
            continue       # removed meanwhile (its writer finished)
        logger.info('removing %s, left by a writer that stopped over %d s ago', path, STALE_AFTER_S)
        remove_quietly(path)
        removed.append(path)
    return removed


def temporary_sibling(target: str | os.PathLike) -> str:
    """A new empty folder '.NAME.tmp-XXXXXXXX' beside `target`, for its writer to rename to `target` when
    complete or remove on a failure; stale ones of writers killed before are removed first."""
    target = os.path.abspath(target)
    remove_stale(os.path.dirname(target), TEMPORARY_FOLDER_RE)
    return tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.tmp-', dir=os.path.dirname(target))
