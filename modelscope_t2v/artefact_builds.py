"""Building the compile cache's artefacts (compile_cache.py): one call of a network exported and compiled to a file,
in worker processes, several at once.

Inductor lowers a graph in one Python thread: a whole UNet call takes it about two minutes. Split into its blocks
(the networks' compile_regions()), the same work runs in parallel: each block's build goes to a pool of worker
processes (build_workers.py), which receive the block as a skeleton (its structure, with weights on the 'meta'
device) and its call's arguments likewise, fill both with random values on the block's device, export the call
and compile it. Weights are the artefact's inputs, so their values do not matter to it; the kernel choices
inductor times do not depend on them either. A block that cannot be pickled (a closure among its attributes) is
built in this process instead.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import tempfile
from concurrent.futures import Future
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import scratch
from .build_workers import WorkerPool
from .cuda_graphs import call_tensors, frozen_call

logger = logging.getLogger(__name__)

MOST_WORKERS = 8   # build processes at once: each holds a CUDA context and a block; more rarely pays


def default_workers() -> int:
    """Build processes for this machine: one per core, at most MOST_WORKERS."""
    return min(MOST_WORKERS, os.cpu_count() or 1)


class Builder:
    """Builds artefacts, in `workers` processes at once (build_workers.py; 0: in this process, one after another).
    A path asked for again while its build runs gets that build."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        self.builds: Dict[str, Future] = {}   # path -> its build, running or done

    def submit(self, network: nn.Module, arguments: list, path: str, options: dict) -> Future:
        """Start building `network`'s call with these arguments into `path`; the future's result is None."""
        if path in self.builds and not self.builds[path].done():
            return self.builds[path]
        skeleton = pickled_skeleton(network) if self.workers else None
        if skeleton is None:
            logger.warning('compile cache: compiling %s for %s (minutes, once per machine)', type(network).__name__,
                           path)
            build_artefact(network, arguments, path, options)
            future = Future()
            future.set_result(None)
        else:
            if self.pool is None:
                logger.warning('compile cache: compiling in %d processes (minutes, once per machine)', self.workers)
                self.pool = WorkerPool(self.workers)
            logger.info('compile cache: building %s for %s', type(network).__name__, path)
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            future = self.pool.submit((skeleton, skeleton_of(arguments), device_of(network), path, options, threads))
        self.builds[path] = future
        return future

    def done(self, path: str) -> bool:
        """Whether the build of `path` has ended (or was waited for)."""
        return path not in self.builds or self.builds[path].done()

    def wait(self, path: str | None = None) -> None:
        """Wait for the build of `path` (if not waited for already), raising its error; None: for every build
        started, then end the workers, giving back their memory (a later build starts them again)."""
        if path is not None:
            if path in self.builds:
                self.builds[path].result()
            return
        builds, self.builds = list(self.builds.values()), {}
        try:
            for build in builds:
                build.result()
        finally:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None


def build_artefact(network: nn.Module, arguments: list, path: str, options: dict) -> None:
    """Export `network`'s call with these arguments, compile it with inductor `options` and save the artefact at
    `path` (atomically): a program of (weights, *tensors), the weights in weight_names order."""
    tensors = call_tensors(arguments)
    frozen = FrozenCall(network, arguments)
    frozen(*tensors)   # eager once: the kernel probes (kernel_probe.py) run outside the trace
    weights = [slots[name] for slots, name in weight_places(network)]
    name = type(network).__name__
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
                                                      options={'config_patches': dict(options)})
    save_atomically(lambda temporary: artifact.save(path=temporary, format='binary'), path)


def build_from_skeleton(skeleton: bytes, arguments: list, device: str, path: str, options: dict,
                        threads: int) -> None:
    """A worker's build: the skeleton network and arguments (pickled_skeleton, skeleton_of) filled with random
    values on `device`, then build_artefact, with `threads` of inductor's compile threads."""
    import torch._inductor.config

    from .torch_key import restore_torch_key
    torch._inductor.config.compile_threads = threads
    restore_torch_key(os.path.dirname(path))
    network = pickle.loads(skeleton).to_empty(device=device)
    with torch.no_grad():
        for tensor in [*network.parameters(), *network.buffers()]:
            random_fill_(tensor)
    arguments = tree_map(lambda value: random_fill_(torch.empty_strided(value.shape, value.stride(),
                                                                        dtype=value.dtype, device=device))
                         if isinstance(value, torch.Tensor) else value, arguments)
    build_artefact(network, arguments, path, options)


def random_fill_(tensor: torch.Tensor) -> torch.Tensor:
    """Small normal values in a floating tensor, zeros in another."""
    return tensor.normal_(0.0, 0.02) if tensor.is_floating_point() else tensor.zero_()


def pickled_skeleton(network: nn.Module) -> bytes | None:
    """The network with its weights on the 'meta' device (shapes, dtypes and strides kept), pickled; None when it
    cannot be pickled."""
    memo = {}
    for tensor in [*network.parameters(), *network.buffers()]:
        meta = skeleton_of(tensor)
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    try:
        return pickle.dumps(copy.deepcopy(network, memo))
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        logger.info('compile cache: %s is built in this process: it cannot be pickled (%s)',
                    type(network).__name__, error)
        return None


def skeleton_of(value):
    """Tensors (in a pytree) as 'meta' tensors of the same shape, dtype and strides."""
    return tree_map(lambda tensor: torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                                       device='meta')
                    if isinstance(tensor, torch.Tensor) else tensor, value)


def device_of(network: nn.Module) -> str:
    """The device of the network's first weight (the CPU for one without)."""
    return str(next(iter([*network.parameters(), *network.buffers()]), torch.empty(0)).device)


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
        out = torch.func.functional_call(self.held[0], dict(zip(self.names, weights)), tensors)
        return keep_channels_last(out)


def keep_channels_last(out: torch.Tensor) -> torch.Tensor:
    """A channels-last output, as traced, said so in the graph (a clone that inductor fuses into the op making it):
    inductor would return it contiguous, and the next block, called with other strides than while building, would
    be a kind of call of its own (a second build, and layout copies)."""
    if out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last):
        return out.clone(memory_format=torch.channels_last)
    return out


def weight_names(network: nn.Module) -> List[str]:
    """The network's parameters' and buffers' names, in the order an artefact takes them."""
    return [name for name, _ in network.named_parameters()] + [name for name, _ in network.named_buffers()]


def weight_places(network: nn.Module) -> list:
    """(the _parameters or _buffers of the module that holds it, its name there) of each of the network's
    weights, in weight_names order: a call reads each where it is then, in microseconds."""
    places = []
    for name in weight_names(network):
        owner, _, attribute = name.rpartition('.')
        module = network.get_submodule(owner)
        places.append((module._parameters if attribute in module._parameters else module._buffers, attribute))
    return places


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
