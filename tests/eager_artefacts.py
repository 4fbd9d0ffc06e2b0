"""Eager stand-ins for inductor's standalone_compile and CompiledArtifact.load: tests of the compile cache's
mechanics run the exported program as traced (seconds, not minutes of lowering)."""

import torch


class EagerArtefact:
    """A compiled artefact whose program runs as traced, not lowered: its file a stand-in that names it."""

    def __init__(self, artefacts: 'EagerArtefacts', graph: torch.fx.GraphModule):
        self.artefacts, self.graph = artefacts, graph

    def save(self, path, format):
        name = f'eager artefact {len(self.artefacts.graphs)}'.encode()
        self.artefacts.graphs[name] = self.graph
        with open(path, 'wb') as f:
            f.write(name)


class EagerArtefacts:
    """torch._inductor's standalone_compile and CompiledArtifact.load with the exported program run as traced: kept
    in memory (serializing the program would take longer than exporting it)."""

    def __init__(self):
        self.graphs = {}

    def standalone_compile(self, graph, example_inputs, dynamic_shapes, options):
        return EagerArtefact(self, graph)

    def load(self, path, format):
        with open(path, 'rb') as f:
            name = f.read()
        if name not in self.graphs:
            raise RuntimeError(f'{path} is not an eager artefact of this test')
        return lambda *inputs: list(self.graphs[name](*inputs))
