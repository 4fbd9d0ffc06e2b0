"""Compiled networks kept on disk: a second process on the same machine skips torch.compile's tracing.

from_pretrained(compile=MODE, compile_cache=True) compiles each network with torch.compiler.precompile instead of
torch.compile. The first call of each kind (cuda_graphs.call_kind: the arguments' shapes, dtypes and strides,
which are None, the network's trace_state()) traces the network once, non-strictly, and lowers it through inductor
with MODE's options. The artefact (Python source and an integrity-tagged cache) goes to one file in the folder,
the kernels to inductor's own cache. A later call of that kind, in this process or another on this machine, loads
the file: no dynamo tracing, no guards, no lowering. Where MODE has CUDA graphs, each kind is captured once and
replayed (cuda_graphs.GraphedCall).

A trace freezes every Python-side choice of forward. The file's name is a hash of all that can change one: the
call's kind, the structure of the network's parameters and buffers (names, shapes, dtypes, strides), the source
of the package's networks, the inductor options, torch's version and the device. Weights are inputs, not
constants: a LoRA written into them in place (lora/apply.py) is seen by a loaded artefact and a captured graph.
Parameters must stay where they are after compiling (as with torch.compile's CUDA graphs); a buffer that is
replaced (UNet3D.remember_text for another count of texts) makes the graphs that read it capture again.

The folder holds code that is executed: it is inductor's cache folder (TORCHINDUCTOR_CACHE_DIR, whose kernels
inductor executes the same way) unless another is given; give only a folder that only you can write.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from . import scratch
from .cuda_graphs import CallsByKind, frozen_call

logger = logging.getLogger(__name__)

NETWORK_SOURCES = Path(__file__).parent / 'models'   # what a trace of the networks reads of this package
FORMAT = 1   # of the artefact files; part of their names


def default_folder() -> str:
    """modelscope_t2v/ in inductor's cache folder (TORCHINDUCTOR_CACHE_DIR), where its kernels are."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return os.path.join(cache_dir(), 'modelscope_t2v')


class CompileCache:
    """A folder of precompiled network calls; compile() is the in-place counterpart of nn.Module.compile."""

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder or default_folder()

    def compile(self, network: nn.Module, options: dict) -> None:
        """Make `network`'s calls run through precompiled artefacts (inductor `options`; CUDA graphs where
        options['triton.cudagraphs'] and the network is on a GPU). Its type, attributes and keys stay its own:
        the calls go through the attribute nn.Module.compile sets."""
        network._compiled_call_impl = PrecompiledCalls(network, self.folder, options)


class PrecompiledCalls(CallsByKind):
    """A network's calls, each kind through its artefact (loaded, else built and saved) and CUDA graph."""

    def __init__(self, network: nn.Module, folder: str, options: dict):
        super().__init__(network)
        self.folder = folder
        self.graphs = bool(options.get('triton.cudagraphs'))
        self.options = {key: value for key, value in options.items() if key != 'triton.cudagraphs'}
        self.built = self.loaded = 0   # artefacts, for tests and logs
        self.builds = True   # False: a kind with no artefact on disk runs eager (TextToVideo.stop_compiling)

    def prepare(self, kind: tuple, arguments: list, tensors: List[torch.Tensor]) -> Callable:
        """The call of this kind: the artefact run directly, or replayed from a CUDA graph of it."""
        path = os.path.join(self.folder, artefact_name(self.network, kind, self.options) + '.pt')
        run = self.load(path)
        if run is None and not self.builds:
            logger.info('compile cache: no %s for this kind of call; it runs eager', path)
            call = frozen_call(arguments)
            return lambda *inputs: call(self.network, *inputs)
        run = run or self.build(path, arguments)
        precompiled = lambda *inputs: run(self.network, *inputs)  # noqa: E731
        return self.graphed(precompiled, tensors, f'compile cache: {path}') if self.graphs else precompiled

    def load(self, path: str) -> Optional[Callable]:
        """The artefact saved at `path`, or None when there is none or it cannot be read (then rebuilt)."""
        if not os.path.exists(path):
            return None
        try:
            saved = torch.load(path, weights_only=True)
            with own_code_loading():
                run = torch.compiler.precompile.load(saved['code'], saved['cache'])
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as error:
            logger.warning('compile cache: %s unreadable (%s); compiling it again', path, error)
            return None
        self.loaded += 1
        logger.info('compile cache: %s loaded', path)
        return run

    def build(self, path: str, arguments: list) -> Callable:
        """Trace one call with these arguments, lower it, save it at `path` (atomically) and return it."""
        call, tensors = frozen_call(arguments), [value for value in arguments if isinstance(value, torch.Tensor)]
        call(self.network, *tensors)   # eager once: the kernel probes (kernel_probe.py) run outside the trace
        from torch._inductor.decomposition import select_decomp_table
        logger.warning('compile cache: compiling %s for %s (minutes, once per machine)',
                       type(self.network).__name__, path)
        with torch._inductor.config.patch(self.options):
            code, cache = torch.compiler.precompile(call, self.network, *tensors, decompositions=select_decomp_table())
        save_atomically({'code': code, 'cache': cache}, path)
        self.built += 1
        with own_code_loading():
            return torch.compiler.precompile.load(code, cache)


@contextlib.contextmanager
def own_code_loading():
    """Inside: torch.compiler.precompile.load without its warning that the code it executes is untrusted input.
    The code is this package's trace, in the folder whose trust the module docstring states."""
    precompile_log = logging.getLogger('torch._precompile')
    precompile_log.addFilter(drop_untrusted_code_warning)
    try:
        yield
    finally:
        precompile_log.removeFilter(drop_untrusted_code_warning)


def drop_untrusted_code_warning(record: logging.LogRecord) -> bool:
    return 'untrusted executable input' not in record.getMessage()


def artefact_name(network: nn.Module, kind: tuple, options: dict) -> str:
    """The file name of a network's artefact for calls of this kind: a hash of everything a trace freezes."""
    tensors = list(network.named_parameters()) + list(network.named_buffers())
    structure = tuple((name, tuple(t.shape), str(t.dtype), t.stride(), str(t.device)) for name, t in tensors)
    device = torch.cuda.get_device_name() if any(t.is_cuda for _, t in tensors) else 'cpu'
    described = repr((FORMAT, type(network).__qualname__, kind, structure, sorted(options.items()),
                      torch.__version__, device, network_source_hash()))
    return f'{type(network).__name__}-{hashlib.sha256(described.encode()).hexdigest()[:32]}'


def network_source_hash() -> str:
    """A hash of the package's network sources: a changed forward makes new artefacts."""
    digest = hashlib.sha256()
    for path in sorted(NETWORK_SOURCES.glob('*.py')):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def save_atomically(artefact: dict, path: str) -> None:
    """torch.save to a temporary file beside `path`, then renamed over it: readers never see half a file, and
    processes that build the same artefact at once each rename a whole one."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    scratch.remove_stale(folder, scratch.TEMPORARY_FOLDER_RE, once=True)   # of builders killed before
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.tmp-')
    try:
        with os.fdopen(handle, 'wb') as f:
            torch.save(artefact, f)
        os.replace(temporary, path)
    except BaseException:
        scratch.remove_quietly(temporary)
        raise
