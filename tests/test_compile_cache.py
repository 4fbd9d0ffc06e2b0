"""compile_cache: networks compiled to disk (inductor's standalone_compile), then loaded by a later engine or process.

On the CPU with inductor's C++ backend; the CUDA-graph replay (cuda_graphs.GraphedCall) cannot run here. Tests of
the cache's mechanics use eager artefacts (the exported program run as traced: seconds, not minutes).
"""

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from modelscope_t2v import build_workers, compile_cache, model_folder, parse_request
from modelscope_t2v.compile_cache import CompileCache, artefact_counts, artefact_name
from modelscope_t2v.cuda_graphs import call_kind
from modelscope_t2v.config import TINY
from modelscope_t2v.models.unet3d import UNet3D
from modelscope_t2v.text_to_video import TextToVideo, check_compile_cache, open_compile_cache
from modelscope_t2v.torch_key import key_path
from reference import randomize_, rel_err

SMALL = {'num_frames': 4, 'height': 64, 'width': 64, 'num_inference_steps': 3, 'seed': 7, 'output_type': 'frames'}
PROMPT = {'text': 'a panda playing the guitar'}
NETWORKS = ('unet', 'text_encoder', 'autoencoder.decoder')
HERE = os.path.dirname(os.path.abspath(__file__))


def networks(engine) -> list:
    return [engine.unet, engine.text_encoder, engine.autoencoder.decoder]


def counts(engine) -> list:
    """(kinds of call built, loaded) of the blocks of the engine's three networks."""
    return [artefact_counts(network) for network in networks(engine)]


def blocks(engine) -> list:
    """How many blocks each of the three networks compiles (its compile_regions)."""
    return [len(network.compile_regions()) for network in networks(engine)]


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


@pytest.fixture
def eager_artefacts(monkeypatch):
    """Eager stand-ins for inductor, built in this process (a worker process would not see them)."""
    artefacts = EagerArtefacts()
    monkeypatch.setattr(compile_cache, 'default_workers', lambda: 0)
    monkeypatch.setattr(torch._inductor, 'standalone_compile', artefacts.standalone_compile)
    monkeypatch.setattr(torch._inductor.CompiledArtifact, 'load', staticmethod(artefacts.load))


@pytest.fixture(scope='module')
def cached_generation(tiny_model_dir, tmp_path_factory):
    """A CPU engine compiled through a compile cache (inductor's standalone_compile), the frames of its first video
    (each block's first call runs as it is while its build runs), of its second (every call compiled), its folder."""
    folder = str(tmp_path_factory.mktemp('compile-cache'))
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('default', compile_cache=folder)
    first = engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0]
    return engine, first, engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0], folder


@pytest.mark.slow
def test_cached_engine_generates_the_frames_of_the_plain_engine(cached_generation, tiny_engine):
    engine, first, frames, folder = cached_generation
    expected = tiny_engine(parse_request(PROMPT, tiny_engine.config, **SMALL)).frames[0].astype(int)
    assert np.abs(first.astype(int) - expected).max() <= 1
    difference = np.abs(frames.astype(int) - expected)
    print(f'cached engine against plain: {np.count_nonzero(difference)} of {difference.size} uint8 values '
          f'differ, by at most {difference.max()}')
    assert frames.shape == (4, 64, 64, 3) and difference.max() <= 1
    assert counts(engine) == [(n, 0) for n in blocks(engine)]
    kinds = sorted(name.split('-')[0] for name in os.listdir(folder))
    print('artefacts:', {kind: kinds.count(kind) for kind in kinds})
    # the UNet's blocks differ (one file each); the text encoder's layers are alike (one file for all)
    assert kinds.count('UNetBlock') + kinds.count('Downsample') == blocks(engine)[0]
    assert kinds.count('ResidualAttentionBlock') == 1 and len(kinds) < sum(blocks(engine))
    print('artefact sizes (bytes):', {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)})


@pytest.mark.slow
def test_weights_written_in_place_after_loading_are_seen(cached_generation, tiny_model_dir):
    """A LoRA is written into the weights in place (lora/apply.py): after the artefacts are loaded, such a change to
    the UNet's and the text encoder's weights changes the frames as it changes the plain engine's."""
    _, _, frames, folder = cached_generation
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('default', compile_cache=folder)
    plain = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    assert np.array_equal(engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0], frames)   # loaded
    for e in (engine, plain):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, weight in [*e.unet.named_parameters(), *e.text_encoder.named_parameters()]:
                if name.endswith(('to_v.weight', 'in_proj_weight')):   # a rank-1 delta, as a LoRA's up @ down
                    up, down = (torch.randn(size, 1, generator=generator) for size in weight.shape)
                    weight.add_(0.2 * up @ down.T)
    got = engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0].astype(int)
    expected = plain(parse_request(PROMPT, plain.config, **SMALL)).frames[0].astype(int)
    print(f'after the change: largest difference from the changed plain engine {np.abs(got - expected).max()}, '
          f'from the frames before it {np.abs(got - frames).max()}')
    assert np.abs(got - expected).max() <= 1 and np.abs(got - frames).max() >= 10
    assert counts(engine) == [(0, n) for n in blocks(engine)]


CHILD = r'''
import json, sys
import numpy as np
from torch._dynamo.utils import counters
from modelscope_t2v import TextToVideo, parse_request
from modelscope_t2v import compile_cache
from modelscope_t2v.compile_cache import artefact_counts
restored, restore = [], compile_cache.restore_torch_key
compile_cache.restore_torch_key = lambda folder: restored.append(restore(folder)) or restored[-1]
model_dir, folder, out, small = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
engine = TextToVideo.from_pretrained(model_dir, device='cpu')
engine.compile_networks('default', compile_cache=folder)
np.save(out, engine(parse_request({'text': 'a panda playing the guitar'}, engine.config, **small)).frames[0])
counts = [artefact_counts(n) for n in (engine.unet, engine.text_encoder, engine.autoencoder.decoder)]
print(json.dumps({'built': [c[0] for c in counts], 'loaded': [c[1] for c in counts],
                  'dynamo_frames': counters['stats'].get('unique_graphs', 0), 'torch_key_restored': restored}))
'''


@pytest.mark.slow
def test_a_second_process_loads_the_artefacts_without_tracing(cached_generation, tiny_model_dir, tmp_path):
    """A fresh interpreter on the same folder: every network loaded, none built, dynamo never traces, inductor's
    torch_key is the one the first process noted, and the frames are the first process's exactly (the same
    kernels)."""
    engine, _, frames, folder = cached_generation
    out = str(tmp_path / 'frames.npy')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                      os.environ.get('PYTHONPATH')]))}
    result = subprocess.run([sys.executable, '-c', CHILD, tiny_model_dir, folder, out, json.dumps(SMALL)],
                            env=env, check=True, stdout=subprocess.PIPE, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print('second process:', report)
    assert report == {'built': [0, 0, 0], 'loaded': blocks(engine), 'dynamo_frames': 0, 'torch_key_restored': [True]}
    assert np.array_equal(np.load(out), frames)


def test_calls_of_another_kind_get_their_own_artefacts(tiny_model_dir, tiny_engine, tmp_path, eager_artefacts):
    """Guided (two texts a video) and unguided (one) UNet calls and a temporal window are traced apart; each
    kind's frames are the plain engine's."""
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('default', compile_cache=str(tmp_path))
    for extra in ({}, {'guidance_scale': 1.0}, {'temporal_window': 2}, {}):
        got = engine(parse_request({**PROMPT, **extra}, engine.config, **SMALL)).frames[0].astype(int)
        expected = tiny_engine(parse_request({**PROMPT, **extra}, tiny_engine.config, **SMALL)).frames[0]
        print(extra, 'largest difference from the plain engine:', np.abs(got - expected).max())
        assert np.abs(got - expected).max() <= 1
        if extra == {'temporal_window': 2}:
            files = sorted(os.listdir(tmp_path))
    unet, text_encoder, decoder = blocks(engine)
    # each block's kinds (the text encoder's: 2 prompts or 1), built or found built for a block alike; the
    # repeated first kind builds nothing more
    assert [built + loaded for built, loaded in counts(engine)] == [3 * unet, 2 * text_encoder, decoder]
    assert sorted(os.listdir(tmp_path)) == files


def test_a_later_cache_of_the_key_preloads_the_artefacts_the_first_used_on_a_thread(tiny_model_dir, tiny_engine,
                                                                                     tmp_path, eager_artefacts,
                                                                                     monkeypatch):
    """After a generation a cache with a key notes the artefacts its calls asked for, in that order; a later cache
    of that key starts loading them on its loader thread as soon as it is made (a warm start loads them while the
    weights load): its calls then load nothing themselves, and the frames are the plain engine's. Another key, or
    no key, preloads nothing; a noted file since deleted is skipped."""
    threads = []
    load = torch._inductor.CompiledArtifact.load
    monkeypatch.setattr(torch._inductor.CompiledArtifact, 'load', staticmethod(
        lambda path, format: (threads.append((threading.current_thread().name, os.path.basename(path))),
                              load(path=path, format=format))[1]))
    first = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    first.compile_networks('default', compile_cache=CompileCache(str(tmp_path), key='k'))
    first(parse_request(PROMPT, first.config, **SMALL))   # builds, then notes what its calls asked for
    noted = (tmp_path / 'used-k.txt').read_text().split()
    assert noted == first.compile_cache.used and len(noted) == len(set(noted)) == len(os.listdir(tmp_path)) - 2
    assert os.path.exists(key_path(str(tmp_path)))   # and inductor's torch_key, for a later process
    assert os.path.basename(noted[0]).startswith('ResidualAttentionBlock-')   # the text encoder's calls came first
    assert all(os.path.dirname(path) == str(tmp_path) and os.path.exists(path) for path in noted)

    threads.clear()
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    cache = CompileCache(str(tmp_path), key='k')
    assert list(cache.loading) == noted
    engine.compile_networks('default', compile_cache=cache)
    got = engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0].astype(int)
    expected = tiny_engine(parse_request(PROMPT, tiny_engine.config, **SMALL)).frames[0]
    print('largest difference from the plain engine:', np.abs(got - expected).max(), 'loads:', threads)
    assert np.abs(got - expected).max() <= 1
    assert threads == [('modelscope-t2v-artefacts_0', os.path.basename(path)) for path in noted]
    assert counts(engine) == [(0, n) for n in blocks(engine)] and cache.loading == {}

    os.remove(noted[-1])
    assert list(CompileCache(str(tmp_path), key='k').loading) == noted[:-1]
    assert CompileCache(str(tmp_path), key='other').loading == {} and CompileCache(str(tmp_path)).loading == {}


def test_artefacts_load_in_the_calling_thread_where_the_loader_thread_could_not_start(tmp_path, eager_artefacts):
    """The loader thread's initializer (torch.cuda.set_device on a GPU) failing costs the preload, not the
    artefacts: each then loads in the thread that needs it."""
    network = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
    first = CompileCache(str(tmp_path), key='k')
    first.compile(network, {})
    network(x)
    first.wait()
    network(x)   # loaded: noted as used
    first.wait()
    (path,) = first.used

    def fail():
        raise RuntimeError('no such GPU')
    cache = CompileCache(str(tmp_path))
    cache.loader = ThreadPoolExecutor(1, initializer=fail)
    cache.loading = {path: cache.loader.submit(compile_cache.load_artefact, path)}   # as a preload of key 'k'
    copied = copy.deepcopy(network)
    cache.compile(copied, {})
    assert rel_err(copied(x), expected) < 1e-6
    assert artefact_counts(copied) == (0, 1) and cache.loading == {}


def test_an_engine_that_fails_to_load_drops_the_preloads_not_yet_started(tiny_model_dir, tmp_path, monkeypatch):
    """from_pretrained failing after it opened the cache (here its weights) cancels the queued preloads: the
    process need not wait for artefacts no engine will use. The load under way runs on."""
    paths = [str(tmp_path / f'Block-{i}.bin') for i in range(3)]
    for path in paths:
        open(path, 'wb').close()
    (tmp_path / 'used-k.txt').write_text('\n'.join(paths) + '\n')
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(compile_cache, 'load_artefact', lambda path: started.set() or release.wait(30))
    cache = CompileCache(str(tmp_path), key='k')
    loading = list(cache.loading.values())
    assert started.wait(30)   # the first load is under way

    def fail(folder):
        raise OSError('weights unreadable')
    monkeypatch.setattr(model_folder, 'load_networks', fail)
    with pytest.raises(OSError, match='weights unreadable'):
        TextToVideo.from_pretrained(tiny_model_dir, device='cpu', compile_cache=cache)
    release.set()
    assert loading[0].result(timeout=30) is True
    assert [future.cancelled() for future in loading] == [False, True, True] and cache.loading == {}


def test_the_preload_key_follows_the_architecture_dtype_device_mode_and_low_memory(tmp_path):
    from modelscope_t2v.config import FULL
    cpu, half = torch.device('cpu'), torch.float16
    key = compile_cache.preload_key(TINY, half, cpu, 'reduce-overhead', False)
    others = [compile_cache.preload_key(FULL, half, cpu, 'reduce-overhead', False),
              compile_cache.preload_key(TINY, torch.bfloat16, cpu, 'reduce-overhead', False),
              compile_cache.preload_key(TINY, half, cpu, 'default', False),
              compile_cache.preload_key(TINY, half, cpu, 'reduce-overhead', True)]
    assert key == compile_cache.preload_key(copy.deepcopy(TINY), half, cpu, 'reduce-overhead', False)
    assert re.fullmatch('[0-9a-f]{32}', key) and len({key, *others}) == 5
    engine = (TINY, half, cpu, 'reduce-overhead', False)   # from_pretrained's, as it opens the cache
    assert open_compile_cache(str(tmp_path), engine).used_file == str(tmp_path / f'used-{key}.txt')
    assert open_compile_cache(str(tmp_path)).used_file is None


def test_artefact_names_follow_what_a_trace_freezes(tmp_path, monkeypatch):
    unet = randomize_(UNet3D(TINY.unet), 0).eval()
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([500])
    unet.remember_text(torch.randn(2, 77, TINY.unet.context_dim))

    def name(x=x, options={'deterministic': True}):
        return artefact_name(unet, call_kind([x, t, None, None], unet.trace_state()), options)

    first = name()
    with torch.no_grad():
        unet.input_blocks[0][0].weight.add_(1.0)   # weights are inputs: a LoRA written in place keeps the name
    assert name() == first and first.startswith('UNet3D-')
    others = {'shape': name(x=torch.randn(1, 4, 6, 8, 8)), 'options': name(options={})}
    unet.set_temporal_window(2, 1)
    others['window'] = name()
    unet.set_temporal_window(None, 1)
    unet.remember_text(torch.randn(1, 77, TINY.unet.context_dim))
    others['texts'] = name()
    unet.remember_text(torch.randn(2, 77, TINY.unet.context_dim))
    assert name() == first
    unet.add_guidance_embedding(256)
    others['guidance embedding'] = name()
    unet.remove_guidance_embedding()
    sources = tmp_path / 'models'
    shutil.copytree(compile_cache.NETWORK_SOURCES, sources)
    (sources / 'unet3d.py').write_text((sources / 'unet3d.py').read_text() + '\n# changed\n')
    monkeypatch.setattr(compile_cache, 'NETWORK_SOURCES', sources)
    others['network source'] = name()
    print(first, others)
    assert len(set(others.values()) | {first}) == len(others) + 1


def test_unreadable_artefact_is_compiled_again(tmp_path, caplog, monkeypatch):
    """A damaged file is replaced by a new build, with a warning naming it; no temporary file stays. Inductor
    itself, on a torch without torch.compiler.precompile (as the GPU machine's 2.11)."""
    monkeypatch.delattr(torch.compiler, 'precompile', raising=False)
    network = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
    outputs, seen = [], []
    for damage in (False, True, False):
        copied = copy.deepcopy(network)
        cache = CompileCache(str(tmp_path))
        cache.compile(copied, {})
        if damage:
            (path,) = tmp_path.iterdir()
            path.write_bytes(b'not an artefact')
        with caplog.at_level(logging.WARNING, logger='modelscope_t2v.compile_cache'):
            outputs.append(copied(x))   # as it is while its build runs
            cache.wait()
            outputs.append(copied(x))   # the artefact
        seen.append(artefact_counts(copied))
    assert seen == [(1, 0), (1, 0), (0, 1)]
    assert any('unreadable' in record.getMessage() and str(path) in record.getMessage() for record in caplog.records)
    assert max(rel_err(output, expected) for output in outputs) < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, os.path.basename(key_path(str(tmp_path)))])


@pytest.mark.parametrize('value,error,message', [(3, TypeError, 'compile_cache=3 is not True, False or a folder'),
                                                 ('FILE', ValueError, 'is a file, not a folder')])
def test_bad_compile_cache_is_refused_before_loading(tmp_path, value, error, message):
    if value == 'FILE':
        value = str(tmp_path / 'a-file')
        open(value, 'w').close()
    with pytest.raises(error, match=message):
        TextToVideo.from_pretrained(str(tmp_path / 'no-model-here'), compile_cache=value)


def test_compile_cache_needs_no_precompile_and_a_torch_without_standalone_compile_is_refused(tmp_path, monkeypatch):
    """torch 2.11 (the GPU machine's) has no torch.compiler.precompile, which the cache does not use: accepted. A
    torch before 2.8 has no standalone_compile: say so before loading, not an AttributeError minutes into the
    first video."""
    monkeypatch.delattr(torch.compiler, 'precompile', raising=False)
    assert check_compile_cache(True) is None and check_compile_cache(str(tmp_path)) is None
    monkeypatch.delattr(torch._inductor, 'standalone_compile')
    with pytest.raises(ValueError, match=r"compile_cache=True needs inductor's standalone_compile, new in torch 2\.8; "
                                         r"this torch is 2\.\d+"):
        TextToVideo.from_pretrained(str(tmp_path / 'no-model-here'), compile_cache=True)


def test_after_stop_compiling_new_kinds_run_eager_and_known_ones_still_load(tiny_model_dir, tiny_engine, tmp_path,
                                                                            eager_artefacts):
    """TextToVideo.stop_compiling (the demo after its warm-up): a kind with an artefact on disk loads, a new one
    runs the network as it is, and nothing is built."""
    first = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    first.compile_networks('default', compile_cache=str(tmp_path))
    first(parse_request(PROMPT, first.config, **SMALL))   # the guided kind, on disk now
    files = len(os.listdir(tmp_path))
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('default', compile_cache=str(tmp_path))
    try:
        engine.stop_compiling()
        for extra in ({}, {'guidance_scale': 1.0}):
            got = engine(parse_request({**PROMPT, **extra}, engine.config, **SMALL)).frames[0].astype(int)
            expected = tiny_engine(parse_request({**PROMPT, **extra}, tiny_engine.config, **SMALL)).frames[0]
            assert np.abs(got - expected).max() <= 1
    finally:
        torch.compiler.set_stance('default')
    print('built, loaded (UNet, text encoder, decoder):', counts(engine), files, 'files')
    assert counts(engine) == [(0, n) for n in blocks(engine)] and len(os.listdir(tmp_path)) == files


class MakesATensor(nn.Module):
    """A network whose forward makes a tensor: its call cannot be compiled with its tensors as the only inputs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(x) + torch.tensor([1.0] * 8)


SCRIPT = r'''
import sys
import torch
from torch import nn
from modelscope_t2v.compile_cache import CompileCache
with open(sys.argv[2], 'a') as f:   # what a script without a main guard does at the top: once, not in each worker
    f.write('ran\n')
network = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
x = torch.randn(3, 8)
cache = CompileCache(sys.argv[1], workers=1)
cache.compile(network, {})
outputs = [network(x)]   # as it is while its build runs in the worker
cache.wait()
outputs.append(network(x))   # its artefact
with torch.no_grad():
    expected = network.forward(x)
print(max(float((output - expected).abs().max()) for output in outputs), network._compiled_call_impl.built)
'''


def test_a_worker_builds_without_running_the_callers_script_again(tmp_path):
    """The build runs in a worker process (build_workers.py), not a multiprocessing one, which would first run the
    calling script again; the artefact computes the network's output."""
    marker = tmp_path / 'ran.txt'
    result = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path / 'cache'), str(marker)], check=True,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONPATH': os.path.dirname(HERE)})
    difference, built = result.stdout.split()
    print('largest difference from the network:', difference)
    assert float(difference) < 1e-5 and built == '1'
    assert marker.read_text() == 'ran\n' and len(os.listdir(tmp_path / 'cache')) == 1


def test_the_workers_end_at_once_and_are_not_waited_for():
    """shutdown() closes every worker's input before any has exited, and returns while they exit (a thread
    waits for them): a generation does not wait for the workers' exits."""
    exits_allowed, events = threading.Event(), []

    class Worker:   # a worker process as WorkerPool uses it: stdin.close(), wait()
        def __init__(self, number):
            self.number, self.stdin = number, self

        def close(self):
            events.append(('input closed', self.number))

        def wait(self):
            assert exits_allowed.wait(timeout=60)
            events.append(('exited', self.number))

    pool = build_workers.WorkerPool(3)
    pool.threads = ThreadPoolExecutor(1)   # as after the first submit(): the workers started
    for number in range(3):
        pool.idle.put(Worker(number))
    pool.shutdown()
    assert events == [('input closed', 0), ('input closed', 1), ('input closed', 2)]
    exits_allowed.set()
    for _ in range(600):
        if len(events) == 6:
            break
        time.sleep(0.01)
    assert events[3:] == [('exited', 0), ('exited', 1), ('exited', 2)]
    assert pool.threads is None and pool.idle.empty()


def test_a_build_failing_in_a_worker_names_the_artefact(tmp_path, monkeypatch):
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([HERE, os.path.dirname(HERE)]))   # the worker imports this module
    network, x = MakesATensor(), torch.randn(2, 8)
    cache = CompileCache(str(tmp_path), workers=1)
    cache.compile(network, {})
    network(x)   # as it is, while the worker fails
    with pytest.raises(RuntimeError, match=r'building .*MakesATensor-\w+\.bin failed: RuntimeError: MakesATensor\.'
                                           r'forward makes tensors that a compiled call cannot take as inputs'):
        cache.wait()
    with pytest.raises(RuntimeError, match=r'compile cache: .*MakesATensor-\w+\.bin was not built'):
        network(x)
    assert os.listdir(tmp_path) == []


def test_a_network_is_captured_once_its_blocks_are_compiled(tiny_model_dir, tiny_engine, tmp_path, eager_artefacts,
                                                           monkeypatch):
    """With CUDA graphs, a network's call is captured around its blocks once none of them is building: while the
    builds run (here: until wait(), at the end of the first video) the call runs as it is, its blocks eager; the
    second video captures each network once, its blocks compiled. (On the CPU graphed() returns the call itself:
    what is checked is when it is asked for.)"""
    from modelscope_t2v.artefact_builds import Builder
    waited, captures = [], []
    monkeypatch.setattr(Builder, 'done', lambda self, path: bool(waited))   # builds end at wait(), not before
    wait = Builder.wait
    monkeypatch.setattr(Builder, 'wait', lambda self, path=None: (waited.append(path) if path is None else None,
                                                                  wait(self, path))[1])
    graphed = compile_cache.GraphsOverBlocks.graphed

    def recording(self, run, tensors, what):
        captures.append((what, len(waited), any(block.building for block in self.blocks)))
        return graphed(self, run, tensors, what)

    monkeypatch.setattr(compile_cache.GraphsOverBlocks, 'graphed', recording)
    engine = TextToVideo.from_pretrained(tiny_model_dir, device='cpu')
    engine.compile_networks('reduce-overhead', compile_cache=str(tmp_path))
    expected = tiny_engine(parse_request(PROMPT, tiny_engine.config, **SMALL)).frames[0].astype(int)
    for video in range(2):
        got = engine(parse_request(PROMPT, engine.config, **SMALL)).frames[0].astype(int)
        assert np.abs(got - expected).max() <= 1
        assert captures == ([] if video == 0 else [('OpenCLIPTextEncoder', 1, False), ('UNet3D', 1, False),
                                                  ('Decoder', 1, False)])
    assert [built + loaded for built, loaded in counts(engine)] == blocks(engine)
