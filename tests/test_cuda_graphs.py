"""cuda_graphs: a network's calls told apart by kind, each kind replayed from a CUDA graph of its eager kernels.

No CUDA here: the capture itself (GraphedCall) runs on the GPU only. On the CPU a captured network runs its eager
forward, which these tests hold to the plain network's numbers; the dispatch by kind, the capture's fallback and
the wiring through from_pretrained, pipeline(), the CLI and the demo are tested with a recording stand-in for
GraphedCall.
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from modelscope_t2v import cuda_graphs, parse_request
from modelscope_t2v.config import TINY
from modelscope_t2v.cuda_graphs import EagerGraphs, buffer_addresses, buffer_places, capture_calls
from modelscope_t2v.models.unet3d import UNet3D
from modelscope_t2v.schedulers import training_schedule
from modelscope_t2v.text_to_video import TextToVideo
from reference import randomize_

SMALL = {'num_frames': 4, 'height': 64, 'width': 64, 'num_inference_steps': 3, 'seed': 7, 'output_type': 'frames'}
PROMPT = {'text': 'a panda playing the guitar'}


class RecordedGraph:
    """Stands in for GraphedCall: records each capture; each call runs eager and, as a replay does, writes the
    result into the one output tensor it returns every time."""
    captured = []
    refusal = None   # a RuntimeError to raise instead, as a capture with a host sync inside does

    def __init__(self, run, tensors, owner):
        if RecordedGraph.refusal is not None:
            raise RecordedGraph.refusal
        RecordedGraph.captured.append([tuple(t.shape) for t in tensors])
        self.run, self.output = run, None

    def __call__(self, *tensors):
        result = self.run(*tensors)
        if self.output is None:
            self.output = result
        return self.output.copy_(result)


@pytest.fixture
def recorded_graphs(monkeypatch):
    """Captures as on a GPU, recorded by RecordedGraph."""
    monkeypatch.setattr(cuda_graphs, 'on_gpu', lambda tensors: bool(tensors))
    monkeypatch.setattr(cuda_graphs, 'GraphedCall', RecordedGraph)
    RecordedGraph.captured, RecordedGraph.refusal = [], None
    return RecordedGraph


def tiny_unet_and_inputs(frames: int = 4):
    torch.manual_seed(0)
    unet = randomize_(UNet3D(TINY.unet), 0).eval()
    x = torch.randn(1, TINY.unet.in_dim, frames, 8, 8)
    context = torch.randn(2, 77, TINY.unet.context_dim)
    return unet, x, torch.tensor([500]), context


def test_on_the_cpu_a_captured_network_gives_its_own_outputs_exactly():
    unet, x, t, context = tiny_unet_and_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
        capture_calls(unet)
        got = unet(x, t, context)
    assert isinstance(unet._compiled_call_impl, EagerGraphs)
    assert torch.equal(got, expected)


def test_each_kind_of_call_is_captured_once(recorded_graphs):
    """The same shapes replay the first capture; other frames, or the remembered text instead of a context
    argument, are kinds of their own; every output stays the eager one."""
    unet, x, t, context = tiny_unet_and_inputs()
    x6 = torch.randn(1, TINY.unet.in_dim, 6, 8, 8)
    with torch.no_grad():
        expected = [unet(x, t, context), unet(x + 1, t, context), unet(x6, t, context)]
        unet.remember_text(context)
        expected.append(unet(x, t))
        capture_calls(unet)
        got = [unet(x, t, context).clone(), unet(x + 1, t, context).clone(), unet(x6, t, context).clone(),
               unet(x, t).clone()]   # each replay overwrites its kind's output
    text = (2, 77, TINY.unet.context_dim)
    assert recorded_graphs.captured == [[(1, 4, 4, 8, 8), (1,), text], [(1, 4, 6, 8, 8), (1,), text],
                                        [(1, 4, 4, 8, 8), (1,)]]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_call_whose_capture_fails_runs_eager_with_a_warning(recorded_graphs, caplog):
    unet, x, t, context = tiny_unet_and_inputs()
    recorded_graphs.refusal = RuntimeError('operation not permitted when stream is capturing')
    with torch.no_grad():
        expected = unet(x, t, context)
        capture_calls(unet)
        with caplog.at_level(logging.WARNING, logger='modelscope_t2v.cuda_graphs'):
            got = [unet(x, t, context), unet(x, t, context)]
    warnings = [r.getMessage() for r in caplog.records if 'without a CUDA graph' in r.getMessage()]
    assert warnings == ['UNet3D runs without a CUDA graph: its capture failed (operation not permitted when stream '
                        'is capturing)']   # once: the second call runs the remembered eager call
    assert all(torch.equal(g, expected) for g in got)


def test_a_replaced_buffer_changes_the_addresses_graphs_check():
    """GraphedCall captures again when a buffer it read was replaced: remember_text writes in place for the same
    count of texts and replaces the buffers for another."""
    unet = randomize_(UNet3D(TINY.unet), 0).eval()
    places = buffer_places(unet)
    assert len(places) == 2 * len(unet.cross_attentions)   # text_k, text_v
    context = torch.randn(2, 77, TINY.unet.context_dim)
    unet.remember_text(context)
    two_texts = buffer_addresses(places)
    unet.remember_text(context + 1)
    assert buffer_addresses(places) == two_texts and 0 not in two_texts
    unet.remember_text(context[:1])
    assert buffer_addresses(places) != two_texts


def test_an_engine_with_captured_networks_makes_the_plain_engines_frames(tiny_model_dir, tiny_engine,
                                                                           recorded_graphs):
    """capture_graphs routes the UNet, the text encoder and the decoder (whose output it then copies out of the
    graph) through their captures; guided, unguided and windowed generations keep every frame."""
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.capture_graphs()
    assert engine.autoencoder.copies_decoder_output
    pndm = PNDMScheduler.from_config({**training_schedule(tiny_engine.config.diffusion), 'skip_prk_steps': True})
    # PNDM keeps each step's eps: unguided, that is the UNet's output, which the next replay overwrites
    for extra in ({}, {'guidance_scale': 1.0, 'sampler': pndm},
                  {'num_frames': 6, 'temporal_window': 4, 'temporal_stride': 2}):
        request = {**SMALL, **extra}
        got = engine(parse_request(PROMPT, engine.config, **request)).frames[0]
        expected = tiny_engine(parse_request(PROMPT, tiny_engine.config, **request)).frames[0]
        assert np.array_equal(got, expected), extra
    captured = {len(shapes) for shapes in recorded_graphs.captured}
    print('captures:', len(recorded_graphs.captured), 'argument counts:', captured)
    # text encoder (tokens), decoder (latents), UNet (x, t, remembered text): guided, unguided and windowed
    assert len(recorded_graphs.captured) == 2 + 2 + 3 and captured == {1, 2}


def test_low_memory_captures_the_unet_only(tiny_model_dir):
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu', low_memory=True)
    engine.capture_graphs()
    assert isinstance(engine.unet._compiled_call_impl, EagerGraphs)
    assert engine.text_encoder._compiled_call_impl is None and engine.autoencoder.decoder._compiled_call_impl is None


@pytest.mark.parametrize('options,error,message', [
    ({'cuda_graphs': 'yes'}, TypeError, "cuda_graphs='yes' is not True or False"),
    ({'cuda_graphs': True, 'compile': 'default'}, ValueError,
     r"cuda_graphs=True replays the uncompiled networks: pass it without compile \(given compile='default'\)"),
])
def test_bad_cuda_graphs_are_refused_before_loading(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        TextToVideo.from_pretrained(str(tmp_path / 'no-model-here'), **options)
