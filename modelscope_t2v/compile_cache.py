"""Compiled networks kept on disk: a second process on the same machine loads them instead of compiling again.

from_pretrained(compile=MODE, compile_cache=True) compiles each network ahead of time instead of through
torch.compile. The first call of each kind (cuda_graphs.call_kind: the arguments' shapes, dtypes and strides,
which are None, the network's trace_state()) is exported once (torch.export, non-strict) and compiled by
inductor's standalone_compile with MODE's options into an artefact: one file in the folder, holding the
compiled graph's code and its kernels. A later call of that kind, in this process or another on this machine,
loads the file: no tracing, no guards, no lowering. Where MODE has CUDA graphs, each kind is captured once and
replayed (cuda_graphs.GraphedCall). standalone_compile is in torch from 2.8 on.

A trace freezes every Python-side choice of forward. The file's name is a hash of all that can change one: the
call's kind, the structure of the network's parameters and buffers (names, shapes, dtypes, strides), the source
of the package's networks, the inductor options, the backend, torch's version and the device.

Weights are inputs, not constants: what is exported is the call with the network's parameters and buffers as
arguments (WeightsAsInputs), and each call passes the tensors the network holds then. So the file holds no copy of
them (the real UNet's weights are 2.8 GB), and a LoRA written into them in place (lora/apply.py), weights moved
to another device and back (low_memory) or a buffer replaced (UNet3D.remember_text) are read where they are at
each call. Under CUDA graphs parameters must stay where they are after the capture (as with torch.compile's); a
buffer that is replaced makes the graphs that read it capture again.

The folder holds code that is executed: it is inductor's cache folder (TORCHINDUCTOR_CACHE_DIR, whose kernels
inductor executes the same way) unless another is given; give only a folder that only you can write.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import scratch
from .cuda_graphs import CallsByKind, frozen_call

logger = logging.getLogger(__name__)

NETWORK_SOURCES = Path(__file__).parent / 'models'   # what a trace of the networks reads of this package
FORMAT = 3      # of the artefact files; part of their names
BACKEND = 'standalone'   # torch.export + inductor's standalone_compile; part of the names


def default_folder() -> str:
    """modelscope_t2v/ in inductor's cache folder (TORCHINDUCTOR_CACHE_DIR), where its kernels are."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return os.path.join(cache_dir(), 'modelscope_t2v')


class CompileCache:
    """A folder of compiled network calls; compile() is the in-place counterpart of nn.Module.compile."""

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder or default_folder()

    def compile(self, network: nn.Module, options: dict) -> None:
        """Make `network`'s calls run through compiled artefacts (inductor `options`; CUDA graphs where
        options['triton.cudagraphs'] and the network is on a GPU). Its type, attributes and keys stay its own:
        the calls go through the attribute nn.Module.compile sets."""
        network._compiled_call_impl = CachedCalls(network, self.folder, options)


class CachedCalls(CallsByKind):
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
        path = os.path.join(self.folder, artefact_name(self.network, kind, self.options) + '.bin')
        run = self.load(path)
        if run is None and not self.builds:
            logger.info('compile cache: no %s for this kind of call; it runs eager', path)
            call = frozen_call(arguments)
            return lambda *inputs: call(self.network, *inputs)
        if run is None:
            self.build(path, arguments)
            run = load_artefact(path)
        weights = weight_places(self.network)
        compiled = lambda *inputs: run([slots[name] for slots, name in weights], *inputs)  # noqa: E731
        return self.graphed(compiled, tensors, f'compile cache: {path}') if self.graphs else compiled

    def load(self, path: str) -> Optional[Callable]:
        """The artefact saved at `path`, or None when there is none or it cannot be read (then rebuilt)."""
        if not os.path.exists(path):
            return None
        try:
            run = load_artefact(path)
        except (OSError, RuntimeError) as error:
            logger.warning('compile cache: %s unreadable (%s); compiling it again', path, error)
            return None
        self.loaded += 1
        logger.info('compile cache: %s loaded', path)
        return run

    def build(self, path: str, arguments: list) -> None:
        """Export one call with these arguments, compile it and save the artefact at `path` (atomically)."""
        tensors = [value for value in arguments if isinstance(value, torch.Tensor)]
        frozen = FrozenCall(self.network, arguments)
        frozen(*tensors)   # eager once: the kernel probes (kernel_probe.py) run outside the trace
        logger.warning('compile cache: compiling %s for %s (minutes, once per machine)',
                       type(self.network).__name__, path)
        weights = [slots[name] for slots, name in weight_places(self.network)]
        name = type(self.network).__name__
        with torch.no_grad():   # an inference graph: with trainable weights as inputs it would hold a backward
            exported = torch.export.export(WeightsAsInputs(frozen), (weights, *tensors), strict=False)
            if exported.constants:   # a tensor made in forward would be one more input, which calls do not pass
                raise RuntimeError(f'{name}.forward makes tensors that a compiled call cannot take as inputs: '
                                   f'{sorted(exported.constants)}')
            if len(exported.graph_signature.user_outputs) != 1:
                raise RuntimeError(f'{name}.forward returns {len(exported.graph_signature.user_outputs)} '
                                   f'tensors; the cache serves calls that return one')
            # the graph's inputs: (weights, *tensors) flattened
            artifact = torch._inductor.standalone_compile(exported.graph_module, [*weights, *tensors],
                                                          dynamic_shapes='from_example_inputs',
                                                          options={'config_patches': dict(self.options)})
        save_atomically(lambda temporary: artifact.save(path=temporary, format='binary'), path)
        self.built += 1


class FrozenCall(nn.Module):
    """network.forward with one kind's arguments frozen in (cuda_graphs.frozen_call): forward(*tensors)."""

    def __init__(self, network: nn.Module, arguments: list):
        super().__init__()
        self.network, self.call = network, frozen_call(arguments)

    def forward(self, *tensors):
        return self.call(self.network, *tensors)


class WeightsAsInputs(nn.Module):
    """What is exported: forward(weights, *tensors), the frozen call with `weights` (the network's parameters and
    buffers, in weight_names order) in place of the network's own. The call is held in a tuple, not as a
    submodule, so that export lifts none of the network's tensors into the artefact."""

    def __init__(self, frozen: FrozenCall):
        super().__init__()
        self.held = (frozen,)
        self.names = ['network.' + name for name in weight_names(frozen.network)]

    def forward(self, weights: List[torch.Tensor], *tensors):
        return torch.func.functional_call(self.held[0], dict(zip(self.names, weights)), tensors)


def weight_names(network: nn.Module) -> List[str]:
    """The network's parameters' and buffers' names, in the order an artefact takes them."""
    return [name for name, _ in network.named_parameters()] + [name for name, _ in network.named_buffers()]


def weight_places(network: nn.Module) -> List[Tuple[Dict[str, torch.Tensor], str]]:
    """(the _parameters or _buffers of the module that holds it, its name there) of each of the network's
    weights, in weight_names order: a call reads each where it is then, in microseconds."""
    places = []
    for name in weight_names(network):
        owner, _, attribute = name.rpartition('.')
        module = network.get_submodule(owner)
        places.append((module._parameters if attribute in module._parameters else module._buffers, attribute))
    return places


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
    digest = hashlib.sha256()
    for path in sorted(NETWORK_SOURCES.glob('*.py')):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def save_atomically(write: Callable[[str], None], path: str) -> None:
    """write(temporary) fills a temporary file beside `path`, then it is renamed over it: readers never see half a
    file, and processes that build the same artefact at once each rename a whole one."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    scratch.remove_stale(folder, scratch.TEMPORARY_FOLDER_RE, once=True)   # of builders killed before
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.tmp-')
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        scratch.remove_quietly(temporary)
        raise
