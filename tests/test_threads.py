"""One pipeline object called from several threads: each result equals the same call made alone."""

import threading

import pytest
import torch

from modelscope.pipelines import pipeline
from modelscope_t2v import TextToVideo, parse_request   # importing the package registers the plugin

# different prompts, seeds and batch shapes: a text, a batch size or a frame count left behind by another
# thread's request (the UNet keeps the running generation's text: UNet3D.remember_text) changes the latents
CALLS = [
    {'text': 'a red car', 'seed': 1, 'num_frames': 2},
    {'text': 'a blue boat on the sea', 'seed': 2, 'num_frames': 3, 'num_videos_per_prompt': 2},
    {'text': ['a panda', 'a kite'], 'seed': 3, 'num_frames': 2, 'guidance_scale': 1.0},
    {'text': 'a green forest at night', 'seed': 4, 'num_frames': 4, 'sampler': 'dpm++2m'},
]
pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py
SMALL = {'height': 16, 'width': 16, 'num_inference_steps': 6, 'output_type': 'latents'}
ONE = {**SMALL, 'num_frames': 2}


@pytest.fixture(scope='module')
def pipe(tiny_model_dir):
    return pipeline('text-to-video-synthesis', tiny_model_dir, device='cpu')


def _run_together(fn, calls) -> list:
    """fn(call) for every call, each in its own thread, all released at once; their results in order."""
    start, results = threading.Barrier(len(calls)), [None] * len(calls)

    def work(i):
        start.wait()
        try:
            results[i] = fn(calls[i])
        except Exception as error:   # reported by the assert below, with the others' results
            results[i] = error
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_threads_sharing_one_pipeline_get_their_own_videos(pipe):
    alone = [pipe(dict(call), **SMALL)['latents'] for call in CALLS]
    assert [tuple(a.shape) for a in alone] == [(1, 4, 2, 2, 2), (2, 4, 3, 2, 2), (2, 4, 2, 2, 2), (1, 4, 4, 2, 2)]
    for _ in range(2):   # interleavings differ from run to run
        together = _run_together(lambda call: pipe(dict(call), **SMALL)['latents'], CALLS)
        errors = [r for r in together if isinstance(r, Exception)]
        assert not errors, errors
        worst = [(a - b).abs().max().item() for a, b in zip(together, alone)]
        assert worst == [0.0] * len(CALLS)   # bit-exact on the CPU
    # the text matters: another thread's text in place of the first call's would show
    other_text = pipe({**CALLS[0], 'text': 'a blue boat on the sea'}, **SMALL)['latents']
    assert (other_text - alone[0]).abs().max().item() > 1e-3


def test_a_callback_that_calls_its_own_engine_is_refused(tiny_engine):
    """The engine runs one generation at a time; its callback starting another would wait forever."""
    def nested(step, timestep, latents):
        tiny_engine(parse_request({'text': 'inner', 'seed': 1}, tiny_engine.config, **ONE))
    request = parse_request({'text': 'outer', 'seed': 1}, tiny_engine.config, callback=nested, **ONE)
    with pytest.raises(RuntimeError, match='callback.*same engine'):
        tiny_engine(request)
    after = tiny_engine(parse_request({'text': 'after', 'seed': 1}, tiny_engine.config, **ONE))
    assert after.latents.shape == (1, 4, 2, 2, 2)   # the engine is free again


def test_engines_on_other_threads_do_not_wait_for_each_other(tiny_model_dir):
    """The lock is the engine's own: two engines generate at the same time."""
    engines = [TextToVideo.from_pretrained(tiny_model_dir, device='cpu') for _ in range(2)]
    inside, both_inside = threading.Barrier(2), []

    def meet(step, timestep, latents):
        if step == 0:
            both_inside.append(inside.wait(timeout=30) is not None)   # raises BrokenBarrierError if alone

    def generate(engine):
        return engine(parse_request({'text': 'a', 'seed': 5}, engine.config, callback=meet, **ONE)).latents
    results = _run_together(generate, engines)
    assert both_inside == [True, True] and torch.equal(results[0], results[1])
