"""compile_ahead: a one-step rehearsal on zeroed weights starts the compile cache's builds before the weights load.

On the CPU with eager stand-ins for inductor (the eager_artefacts fixture: builds run in this process, at once),
so each build's file is on disk when the rehearsal returns, and the real engine shows which of its calls found one.
"""

import gc
import logging
import os
import weakref

import numpy as np
import pytest
import torch

from modelscope_t2v import compile_ahead, model_folder, parse_request, text_to_video
from modelscope_t2v.artefact_builds import Builder
from modelscope_t2v.compile_ahead import rehearsal_request, start_builds
from modelscope_t2v.compile_cache import CompileCache, artefact_counts
from modelscope_t2v.text_to_video import TextToVideo

SHAPE = {'num_frames': 4, 'height': 64, 'width': 64}
SMALL = {**SHAPE, 'num_inference_steps': 3, 'seed': 7, 'output_type': 'frames'}
PROMPT = {'text': 'a panda playing the guitar'}


def counts(engine) -> list:
    """(kinds of call built, loaded) of the engine's three networks."""
    return [artefact_counts(network) for network in (engine.unet, engine.text_encoder, engine.autoencoder.decoder)]


def blocks(engine) -> list:
    return [len(network.compile_regions()) for network in (engine.unet, engine.text_encoder, engine.autoencoder.decoder)]


def artefacts(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.endswith('.bin'))


def rehearse(config, folder: str, shape: dict) -> CompileCache:
    cache = CompileCache(folder)
    start_builds(TextToVideo, config, torch.device('cpu'), torch.float32, rehearsal_request(shape, config),
                 'default', cache)
    return cache


def test_the_rehearsal_builds_every_artefact_the_first_generation_uses(tiny_model_dir, tiny_engine, tmp_path,
                                                                       eager_artefacts):
    """After a rehearsal of the same shape, the first generation of an engine with the real weights finds every
    one of its calls built (it builds none), notes only what it used, and makes the plain engine's frames."""
    cache = rehearse(tiny_engine.config, str(tmp_path), SHAPE)
    built = artefacts(tmp_path)
    assert cache.used == [] and len(built) >= 3
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('default', cache)
    got = engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0].astype(int)
    expected = tiny_engine(parse_request(PROMPT, tiny_engine.config, **SMALL)).frames[0]
    print('largest difference from the plain engine:', np.abs(got - expected).max())
    assert np.abs(got - expected).max() <= 1
    assert counts(engine) == [(0, n) for n in blocks(engine)]
    assert artefacts(tmp_path) == built   # nothing else was built
    assert sorted(os.path.basename(path) for path in cache.used) == built


def test_a_rehearsal_of_another_shape_leaves_the_first_generation_its_own_builds(tiny_model_dir, tiny_engine,
                                                                                 tmp_path, eager_artefacts):
    """The rehearsal's guess was wrong (another frame count): the first generation builds the UNet's and the
    decoder's kinds itself (the text encoder's are the same) and its frames are still the plain engine's."""
    cache = rehearse(tiny_engine.config, str(tmp_path), {**SHAPE, 'num_frames': 2})
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('default', cache)
    got = engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0].astype(int)
    expected = tiny_engine(parse_request(PROMPT, tiny_engine.config, **SMALL)).frames[0]
    assert np.abs(got - expected).max() <= 1
    unet, text_encoder, decoder = counts(engine)
    assert unet[0] == blocks(engine)[0] and decoder[0] >= 1 and text_encoder == (0, blocks(engine)[1])


def test_the_rehearsals_networks_are_freed_when_it_returns(tiny_engine, tmp_path, eager_artefacts, monkeypatch):
    made = []
    zeroed = compile_ahead.zeroed_networks

    def watched(*arguments):
        networks = zeroed(*arguments)
        made.extend(weakref.ref(network) for network in networks)
        return networks
    monkeypatch.setattr(compile_ahead, 'zeroed_networks', watched)
    gc.disable()   # only the rehearsal's own collection may free them
    try:
        rehearse(tiny_engine.config, str(tmp_path), SHAPE)
        assert len(made) == 3 and [ref() for ref in made] == [None] * 3
    finally:
        gc.enable()


def test_zeroed_networks_have_the_models_structure(tiny_engine):
    networks = compile_ahead.zeroed_networks(tiny_engine.config, torch.device('cpu'), torch.float16)
    for zeroed, real in zip(networks, (tiny_engine.text_encoder, tiny_engine.unet, tiny_engine.autoencoder)):
        shapes = {name: (tuple(t.shape), t.stride()) for name, t in zeroed.state_dict().items()}
        assert shapes == {name: (tuple(t.shape), t.stride()) for name, t in real.state_dict().items()}
        assert all(t.dtype == torch.float16 and t.count_nonzero() == 0 for t in zeroed.state_dict().values()
                   if t.is_floating_point())


def test_the_rehearsal_is_the_asked_shape_in_one_step(tiny_engine):
    request = rehearsal_request({**SHAPE, 'guidance_scale': 1.0}, tiny_engine.config)
    assert (request.num_frames, request.height, request.width, request.guidance_scale) == (4, 64, 64, 1.0)
    assert (request.num_inference_steps, request.output_type, request.output_video) == (1, 'frames', None)
    default = rehearsal_request(True, tiny_engine.config)
    assert (default.num_frames, default.height, default.width) == (tiny_engine.config.max_frames,
                                                                    tiny_engine.config.height,
                                                                    tiny_engine.config.width)


@pytest.mark.parametrize('value, error, message', [
    ('yes', TypeError, "compile_ahead='yes' is not True, False or a dict"),
    ({'num_inference_steps': 4}, ValueError, "options ['num_inference_steps'] that do not shape"),
    ({'num_frames': 0}, ValueError, 'num_frames'),
])
def test_bad_compile_ahead_is_refused_before_loading(tiny_model_dir, value, error, message, monkeypatch):
    monkeypatch.setattr(model_folder, 'load_networks', lambda folder: pytest.fail('the weights were read'))
    with pytest.raises(error) as raised:
        TextToVideo.from_pretrained(tiny_model_dir, device='cpu', compile_ahead=value)
    assert message in str(raised.value)


def test_a_failed_rehearsal_is_reported_and_loading_goes_on(monkeypatch, caplog):
    def failing(*arguments):
        raise RuntimeError('no such kernel')
    monkeypatch.setattr(text_to_video, 'start_builds', failing)
    with caplog.at_level(logging.WARNING):
        text_to_video.compile_ahead_of_loading()
    assert 'compile_ahead: the rehearsal failed (RuntimeError: no such kernel)' in caplog.text


def test_a_path_asked_for_again_after_its_build_ended_gets_that_build(tmp_path, monkeypatch):
    """The rehearsal's build may end between the real call's look for the file and its submit: no second build."""
    builds = []
    monkeypatch.setattr('modelscope_t2v.artefact_builds.build_artefact',
                        lambda network, arguments, path, options: builds.append(path))
    builder = Builder(0)
    first = builder.submit(torch.nn.Linear(1, 1), [], str(tmp_path / 'a.bin'), {})
    assert first.done() and builder.submit(torch.nn.Linear(1, 1), [], str(tmp_path / 'a.bin'), {}) is first
    assert builds == [str(tmp_path / 'a.bin')]
