"""A network's calls told apart by kind, each kind replayed from a CUDA graph: without compiling, or compiled.

A network's calls differ in what a capture or a trace freezes: the kind of call (call_kind: the arguments' shapes,
dtypes, strides and devices, the values of the others, the network's trace_state()). CallsByKind prepares each new
kind once and then calls it with the call's tensors; it takes the place of the network's forward through the
attribute nn.Module.compile sets, so the network keeps its type, attributes and keys.

capture_calls(network) (from_pretrained's cuda_graphs=True) replays the network's own eager kernels: each kind of
call on a GPU is run twice, captured in a CUDA graph, then replayed. The results are eager's; what goes is the
host's time to launch each of the step's kernels, for a capture of seconds instead of torch.compile's minutes.
compile_cache.py captures a network's calls the same way, around its compiled blocks.

A replay reads the static copies of its inputs, and the parameters and buffers where they were at the capture:
parameters must stay where they are (LoRAs are written into them in place, lora/apply.py); a buffer that was
replaced (UNet3D.remember_text for another count of texts) makes the graphs that read it capture again. The
output is the graph's own memory, overwritten by the next replay of the network (as with torch.compile's CUDA
graphs). A call whose capture fails (a sync with the host inside) runs as it is, with a warning.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)


def call_kind(arguments: list, state: tuple) -> tuple:
    """What a trace or capture of one call depends on besides its tensors' values: forward's arguments, positional
    and flattened (torch's pytree: dataclasses such as Conditioning, registered, open into their fields), a tensor by
    its (shape, dtype, stride, device), and the network's trace_state(). Hashable: the key of its call."""
    return kind_of(*tree_flatten(arguments), state)


def kind_of(leaves: list, structure, state: tuple) -> tuple:
    """call_kind of arguments already flattened into (leaves, structure)."""
    return (str(structure),) + tuple(describe(value) for value in leaves) + (('state', state),)


def describe(value) -> tuple:
    """A call argument as its kind: a tensor by layout (its values are the call's input), others by value."""
    if isinstance(value, torch.Tensor):
        return 'tensor', tuple(value.shape), str(value.dtype), value.stride(), str(value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return 'value', value
    raise TypeError(f'a call by kind takes tensors, None, numbers, strings and pytrees of them; got '
                    f'{type(value).__name__}')


def call_tensors(arguments: list) -> List[torch.Tensor]:
    """The tensors among the arguments' flattened leaves, in order: a call's inputs."""
    return [value for value in tree_flatten(arguments)[0] if isinstance(value, torch.Tensor)]


def frozen_call(arguments: list) -> Callable:
    """call(network, *tensors): network.forward with these arguments, the tensors in place of theirs (in
    call_tensors order), without autograd. What a trace or a capture of one kind of call runs: the other arguments
    are frozen in it."""
    leaves, structure = tree_flatten(arguments)
    positions = [i for i, value in enumerate(leaves) if isinstance(value, torch.Tensor)]

    def call(network, *tensors):
        filled = list(leaves)
        for i, tensor in zip(positions, tensors):
            filled[i] = tensor
        with torch.no_grad():
            return network.forward(*tree_unflatten(filled, structure))
    return call


class CallsByKind:
    """A network's calls, each kind prepared once by prepare(kind, arguments, tensors) and then called with the
    call's tensors."""

    def __init__(self, network: nn.Module, state: Callable[[], tuple] | None = None):
        self.network = network
        self.state = state or getattr(network, 'trace_state', tuple)   # a region's is its network's
        self.signature = inspect.signature(network.forward)
        self.calls: Dict[tuple, Callable] = {}   # call_kind -> its call
        self.pool = None   # one CUDA graph memory pool for the network's graphs, which never run at once

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = list(bound.arguments.values())
        leaves, structure = tree_flatten(arguments)
        tensors = [value for value in leaves if isinstance(value, torch.Tensor)]
        kind = kind_of(leaves, structure, self.state())
        call = self.calls.get(kind)
        if call is None:
            call = self.calls[kind] = self.prepare(kind, arguments, tensors)
        return call(*tensors)

    def prepare(self, kind: tuple, arguments: list, tensors: List[torch.Tensor]) -> Callable:
        raise NotImplementedError

    def graphed(self, run: Callable, tensors: List[torch.Tensor], what: str) -> Callable:
        """run(*tensors) replayed from a CUDA graph where the tensors are on a GPU; else, or where the capture
        fails, run itself."""
        if not on_gpu(tensors):
            return run
        try:
            return GraphedCall(run, tensors, self)
        except RuntimeError as error:   # what the capture refuses runs as it is, a little slower
            logger.warning('%s runs without a CUDA graph: its capture failed (%s)', what, error)
            return run


def on_gpu(tensors: List[torch.Tensor]) -> bool:
    """Whether a call's tensors are on a GPU, where its CUDA graph can be captured."""
    return bool(tensors) and tensors[0].is_cuda


class EagerGraphs(CallsByKind):
    """A network's eager forward, each kind of call on a GPU replayed from its CUDA graph."""

    def prepare(self, kind: tuple, arguments: list, tensors: List[torch.Tensor]) -> Callable:
        call = frozen_call(arguments)
        return self.graphed(lambda *inputs: call(self.network, *inputs), tensors, type(self.network).__name__)


def capture_calls(network: nn.Module) -> None:
    """Make `network`'s calls on a GPU replay CUDA graphs of its eager kernels, one per kind of call (in place)."""
    network._compiled_call_impl = EagerGraphs(network)


class GraphedCall:
    """One kind of call captured in a CUDA graph over static copies of its inputs and replayed. The output is
    the graph's, overwritten by the next replay. Captured again when a buffer of the network has been replaced
    since."""

    def __init__(self, run: Callable, tensors: List[torch.Tensor], owner: CallsByKind):
        self.run, self.owner = run, owner
        self.inputs = [tensor.clone() for tensor in tensors]   # clone keeps the strides the call was made for
        self.buffers = buffer_places(owner.network)
        self.capture()

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up off the capture: the library handles and workspaces it makes
            for _ in range(2):
                self.run(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.owner.pool is None:
            self.owner.pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local, as torch.compile's CUDA graphs: another thread's CUDA calls do not break this capture
        with torch.cuda.graph(self.graph, pool=self.owner.pool, capture_error_mode='thread_local'):
            self.output = self.run(*self.inputs)
        self.addresses = buffer_addresses(self.buffers)

    def __call__(self, *tensors):
        if buffer_addresses(self.buffers) != self.addresses:
            self.capture()
        for static, tensor in zip(self.inputs, tensors):
            static.copy_(tensor)
        self.graph.replay()
        return self.output


def buffer_places(network: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, name) of every buffer of the network: where a replaced buffer would be found."""
    return [(module, name) for module in network.modules() for name in module._buffers]


def buffer_addresses(places: List[Tuple[nn.Module, str]]) -> tuple:
    """The data pointers of those buffers now (0 for an unset one)."""
    return tuple(0 if buffer is None else buffer.data_ptr()
                 for buffer in (module._buffers[name] for module, name in places))
