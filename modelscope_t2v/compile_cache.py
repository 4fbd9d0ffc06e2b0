"""Compiled networks kept on disk: a second process on the same machine loads them instead of compiling again.

from_pretrained(compile=MODE, compile_cache=True) compiles each network ahead of time instead of through
torch.compile, block by block: the network's compile_regions() (the UNet's 25 blocks, the text encoder's layers,
the decoder's 18 blocks) each take the place of their forward through the attribute nn.Module.compile
sets, and what lies between them runs as it is. The first call of each kind of a block (cuda_graphs.call_kind:
its arguments' shapes, dtypes and strides, the others' values, the network's trace_state()) runs as it is and
starts the build of its artefact in a pool of processes (artefact_builds.py: exported, then compiled by inductor's
standalone_compile with MODE's options into one file); it runs so until the build is done, then loads the file.
So the blocks of all three networks compile at once, in parallel, while the first video is made uncompiled, and
blocks alike share one file; the generation returns once its builds are done (TextToVideo calls wait()). A later
process loads the files: no tracing, no guards, no lowering. Where MODE has CUDA graphs, each kind of call of the
whole network is captured once its blocks are compiled, and replayed (GraphsOverBlocks). standalone_compile is in
torch from 2.8 on.

A trace freezes every Python-side choice of forward. The file's name is a hash of all that can change one: the
call's kind, the structure of the block's parameters and buffers (names, shapes, dtypes, strides), the source of
the package's networks, the inductor options, the backend, torch's version and the device.

Weights are inputs, not constants: each call passes the tensors the block holds then. So the file holds no copy of
them (the real UNet's weights are 2.8 GB), and a LoRA written into them in place (lora/apply.py), weights moved
to another device and back (low_memory) or a buffer replaced (UNet3D.remember_text) are read where they are at
each call. Under CUDA graphs parameters must stay where they are after the capture (as with torch.compile's); a
buffer that is replaced makes the graphs that read it capture again.

A warm start loads its artefacts while the weights load: each engine's cache writes, after a generation, the
artefacts its calls used in the order they first used them (used-KEY.txt in the folder; KEY the engine's model
structure, dtype, device, mode and low_memory: preload_key), and a later engine of that key starts loading them on
a thread as soon as it is made, before its weights are read. Every load runs on that one thread, in turn:
inductor's loading is not made to run on two threads at once. Inductor's torch_key, which every load checks, is
read from the folder where an earlier process wrote it for the same torch files (torch_key.py), not computed again.

The folder holds code that is executed: it is inductor's cache folder (TORCHINDUCTOR_CACHE_DIR, whose kernels
inductor executes the same way) unless another is given; give only a folder that only you can write.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .artefact_builds import Builder, default_workers, save_atomically, weight_places
from .cuda_graphs import CallsByKind, frozen_call
from .torch_key import remember_torch_key, restore_torch_key

logger = logging.getLogger(__name__)

NETWORK_SOURCES = Path(__file__).parent / 'models'   # what a trace of the networks reads of this package
FORMAT = 4      # of the artefact files; part of their names
BACKEND = 'standalone'   # torch.export + inductor's standalone_compile; part of the names


def default_folder() -> str:
    """modelscope_t2v/ in inductor's cache folder (TORCHINDUCTOR_CACHE_DIR), where its kernels are."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return os.path.join(cache_dir(), 'modelscope_t2v')


class CompileCache:
    """A folder of compiled calls; compile() is the in-place counterpart of nn.Module.compile. `workers`: the build
    processes (None: one a core, at most artefact_builds.MOST_WORKERS; 0: builds in this process). `key`
    (preload_key): preload the artefacts an earlier engine of this key used; `device`: the networks' device."""

    def __init__(self, folder: Optional[str] = None, workers: Optional[int] = None, key: Optional[str] = None,
                 device: Optional[torch.device] = None):
        self.folder = folder or default_folder()
        self.builder = Builder(default_workers() if workers is None else workers)
        self.artefacts: Dict[str, Callable] = {}   # path -> its artefact, shared by the blocks that are alike
        self.used: List[str] = []   # the artefacts' paths in the order calls first asked for them
        self.used_file = os.path.join(self.folder, f'used-{key}.txt') if key else None
        initializer = None
        if device is not None and device.type == 'cuda':   # the loader thread loads kernels onto the networks' GPU
            index = torch.cuda.current_device() if device.index is None else device.index
            initializer = functools.partial(torch.cuda.set_device, index)
        self.loader = ThreadPoolExecutor(1, 'modelscope-t2v-artefacts', initializer=initializer)
        self.noted = read_used(self.used_file)   # the list in used_file, as read or last written here
        restore_torch_key(self.folder)   # else the first load computes it: 1-1.9 s on the loader thread (torch_key.py)
        self.loading: Dict[str, Future] = {path: self.loader.submit(load_artefact, path)
                                           for path in self.noted if os.path.exists(path)}

    def compile(self, network: nn.Module, options: dict) -> None:
        """Make `network`'s calls run through compiled artefacts of its compile_regions() (of the whole network if
        it has none), with inductor `options`; captured in CUDA graphs where options['triton.cudagraphs'] and the
        network is on a GPU. Its type, attributes and keys stay its own."""
        graphs = bool(options.get('triton.cudagraphs'))
        options = {key: value for key, value in options.items() if key != 'triton.cudagraphs'}
        if not hasattr(network, 'compile_regions'):
            network._compiled_call_impl = CachedCalls(network, self, options, graphs)
            return
        for region in network.compile_regions():
            region._compiled_call_impl = CachedCalls(region, self, options, False, getattr(network, 'trace_state',
                                                                                             None))
        if graphs:
            network._compiled_call_impl = GraphsOverBlocks(network)

    def artefact(self, path: str) -> Optional[Callable]:
        """The artefact saved at `path`, loaded once (on the loader thread, preloaded or now); None when there is
        none or it cannot be read (then rebuilt)."""
        if path not in self.artefacts:
            loading = self.loading.pop(path, None)
            if loading is None and not os.path.exists(path):
                return None
            try:
                self.artefacts[path] = self.load(path, loading)
            except (OSError, RuntimeError) as error:
                logger.warning('compile cache: %s unreadable (%s); compiling it again', path, error)
                return None
            logger.info('compile cache: %s loaded', path)
        return self.artefacts[path]

    def load(self, path: str, loading: Optional[Future]) -> Callable:
        """The artefact at `path` from its preload, else loaded on the loader thread now; in this thread where the
        loader thread could not start (its initializer failed)."""
        try:
            return (loading or self.loader.submit(load_artefact, path)).result()
        except futures.BrokenExecutor:
            return load_artefact(path)

    def cancel_preloads(self) -> None:
        """Drop the preloads not yet started: the engine this cache was opened for failed to load, and its
        process need not wait for them (a load under way runs on). The cache stays usable."""
        for loading in self.loading.values():
            loading.cancel()
        self.loading = {}

    def wait(self) -> None:
        """Wait for every build started, raising the first error: a generation ends with its networks compiled;
        then note the artefacts used so far for a later engine's preload, where they are new, and inductor's
        torch_key."""
        self.builder.wait()
        if self.artefacts:   # loading them computed inductor's torch_key: kept for a later process
            remember_torch_key(self.folder)
        if self.used_file and self.used != self.noted:
            save_atomically(lambda temporary: Path(temporary).write_text('\n'.join(self.used) + '\n'),
                            self.used_file)
            self.noted = list(self.used)


class CachedCalls(CallsByKind):
    """A network's (or a block's) calls, each kind through its artefact (loaded, else built) and, with `graphs`,
    its CUDA graph; `state`: what its kinds depend on besides the arguments (a block's network's trace_state)."""

    def __init__(self, network: nn.Module, cache: CompileCache, options: dict, graphs: bool,
                 state: Callable[[], tuple] | None = None):
        super().__init__(network, state)
        self.cache, self.options, self.graphs = cache, options, graphs
        self.built = self.loaded = 0   # kinds whose artefact was built (here or for a block alike), was on disk
        self.builds = True   # False: a kind with no artefact on disk runs eager (TextToVideo.stop_compiling)
        self.building = set()   # kinds whose artefact is being built, or built and not yet loaded

    def prepare(self, kind: tuple, arguments: list, tensors: List[torch.Tensor]) -> Callable:
        """The call of this kind: the artefact, run directly or replayed from a CUDA graph of it; where there is
        none, the network as it is while its build runs, then the artefact."""
        path = os.path.join(self.cache.folder, artefact_name(self.network, kind, self.options) + '.bin')
        if path not in self.cache.used:
            self.cache.used.append(path)
        if self.cache.artefact(path) is not None:
            self.loaded += 1
            return self.ready(path, tensors)
        call = frozen_call(arguments)
        eager = lambda *inputs: call(self.network, *inputs)  # noqa: E731
        if not self.builds:
            logger.info('compile cache: no %s for this kind of call; it runs eager', path)
            return eager
        futures.wait(self.cache.loading.values())   # inductor builds or loads on one thread at a time
        self.cache.builder.submit(self.network, arguments, path, self.options)
        self.built += 1
        self.building.add(kind)

        def building(*inputs):
            if not self.cache.builder.done(path):
                return eager(*inputs)
            self.cache.builder.wait(path)   # raises the build's error
            self.building.discard(kind)
            if self.cache.artefact(path) is None:
                raise RuntimeError(f'compile cache: {path} was not built (its build failed)')
            self.calls[kind] = self.ready(path, list(inputs))
            return self.calls[kind](*inputs)
        return building

    def ready(self, path: str, tensors: List[torch.Tensor]) -> Callable:
        """The loaded artefact at `path` as a call of the network's tensors, graphed if `graphs`."""
        run, weights = self.cache.artefact(path), weight_places(self.network)
        compiled = lambda *inputs: run([slots[name] for slots, name in weights], *inputs)  # noqa: E731
        return self.graphed(compiled, tensors, f'compile cache: {path}') if self.graphs else compiled


class GraphsOverBlocks(CallsByKind):
    """A network's calls, each kind replayed from a CUDA graph captured around its compiled blocks once none of
    them is building any more; until then the call runs as it is, its blocks compiled or not."""

    def __init__(self, network: nn.Module):
        super().__init__(network)
        self.blocks = compiled_calls(network)

    def prepare(self, kind: tuple, arguments: list, tensors: List[torch.Tensor]) -> Callable:
        call = frozen_call(arguments)
        run = lambda *inputs: call(self.network, *inputs)  # noqa: E731

        def capturing(*inputs):
            out = run(*inputs)   # the blocks' first calls of a kind start their builds
            if not any(block.building for block in self.blocks):
                self.calls[kind] = self.graphed(run, list(inputs), type(self.network).__name__)
            return out
        return capturing


def preload_key(config, dtype: torch.dtype, device: torch.device, mode: str, low_memory: bool) -> str:
    """What the artefacts an engine uses depend on, beside its calls' shapes: the networks' structure (`config`),
    dtype and device, the compile mode and low_memory (which compiles fewer networks, with other options)."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    described = repr((FORMAT, BACKEND, config, str(dtype), name, mode, low_memory, torch.__version__,
                      network_source_hash()))
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def read_used(path: Optional[str]) -> List[str]:
    """The artefact paths an earlier engine noted in `path` (CompileCache.wait); none without such a file."""
    if path is None:
        return []
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:   # none written yet, or just removed
        return []


def compiled_calls(network: nn.Module) -> List[CachedCalls]:
    """The CachedCalls of the network and its blocks."""
    return [module._compiled_call_impl for module in network.modules()
            if isinstance(getattr(module, '_compiled_call_impl', None), CachedCalls)]


def artefact_counts(network: nn.Module) -> tuple:
    """(artefacts built, found on disk) by the network's calls and its blocks'."""
    calls = compiled_calls(network)
    return sum(c.built for c in calls), sum(c.loaded for c in calls)


def load_artefact(path: str) -> Callable:
    """The artefact at `path` as run(weights, *tensors) -> the call's output."""
    artifact = torch._inductor.CompiledArtifact.load(path=path, format='binary')

    def run(weights: List[torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return artifact(*weights, *tensors)[0]
    return run


def artefact_name(network: nn.Module, kind: tuple, options: dict) -> str:
    """The file name of a network's artefact for calls of this kind: a hash of everything a trace freezes."""
    tensors = list(network.named_parameters()) + list(network.named_buffers())
    structure = tuple((name, tuple(t.shape), str(t.dtype), t.stride(), str(t.device)) for name, t in tensors)
    device = torch.cuda.get_device_name() if any(t.is_cuda for _, t in tensors) else 'cpu'
    described = repr((FORMAT, BACKEND, type(network).__qualname__, kind, structure, sorted(options.items()),
                      torch.__version__, device, network_source_hash()))
    return f'{type(network).__name__}-{hashlib.sha256(described.encode()).hexdigest()[:32]}'


def network_source_hash() -> str:
    """A hash of the package's network sources: a changed forward makes new artefacts."""
    return source_hash(NETWORK_SOURCES)


@functools.lru_cache
def source_hash(folder: Path) -> str:
    """A hash of the folder's Python files, read once a process (each block's artefact name needs it)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob('*.py')):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()
