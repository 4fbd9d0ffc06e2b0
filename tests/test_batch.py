"""`modelscope-t2v batch`: bad lines, the manifest, resuming, and two ranks under torchrun."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from modelscope_t2v import batch
from modelscope_t2v.text_to_video import TextToVideo
from modelscope_t2v.video_io import probe_video

TINY_FLAGS = ['--device', 'cpu', '--num-frames', '2', '--height', '64', '--width', '64', '--steps', '1',
              '--guidance-scale', '1']


def write_lines(path, lines):
    path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n' for line in lines))
    return str(path)


def manifest(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def generated(monkeypatch):
    """The prompts that reach the engine, in order: one per generated video."""
    texts, call = [], TextToVideo.__call__

    def counting(self, request):
        texts.extend(request.prompts)
        return call(self, request)

    monkeypatch.setattr(TextToVideo, '__call__', counting)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    return texts


def test_bad_lines_are_reported_and_skipped(tiny_model_dir, tmp_path, generated, capsys):
    prompts = write_lines(tmp_path / 'prompts.jsonl', [
        {'text': 'line 1', 'seed': 7},
        '{"text": "line 2", "seed": ',                            # invalid JSON
        {'text': 'line 3', 'num_frames': 3, 'output': 'sub/three.mp4'},  # the line's keys win
        {'text': 'line 4', 'height': 250},                        # not a multiple of 8
        {'text': 'line 5', 'sampler': 'dpm++2m'},
        {'text': 'line 6', 'out_height': 256},                    # unknown key: batch files stay strict
    ])
    out = tmp_path / 'out'
    status = batch.main([prompts, '--out', str(out), '--model', tiny_model_dir] + TINY_FLAGS)
    err = capsys.readouterr().err
    assert status == batch.EXIT_SOME_FAILED == 3
    assert 'line 2: invalid JSON' in err and 'line 4: height=250 is not a multiple of 8' in err
    assert "line 6: unknown generation options ['out_height']" in err
    assert not any(f'line {n}:' in err for n in (1, 3, 5))
    assert generated == ['line 1', 'line 3', 'line 5']  # bad lines never reach the model
    files = {1: '00001.mp4', 3: os.path.join('sub', 'three.mp4'), 5: '00005.mp4'}
    assert {n: probe_video(out / f)['frames'] for n, f in files.items()} == {1: 2, 3: 3, 5: 2}
    entries = manifest(out / 'manifest.jsonl')
    assert [e['line'] for e in entries] == [1, 3, 5]
    assert [e['output'] for e in entries] == list(files.values())
    assert entries[0]['parameters']['seed'] == 7
    assert all(isinstance(e['parameters']['seed'], int) for e in entries)  # drawn ones are reported
    assert [e['parameters']['num_frames'] for e in entries] == [2, 3, 2]
    assert [e['parameters']['sampler'] for e in entries] == ['ddim', 'ddim', 'dpm++2m']
    assert all(0 < e['seconds'] < 60 for e in entries)


def test_resume_redoes_only_unfinished_items_and_overwrite_redoes_all(tiny_model_dir, tmp_path, generated, capsys):
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': f'line {n}', 'seed': n} for n in range(1, 5)])
    out = tmp_path / 'out'
    argv = [prompts, '--out', str(out), '--model', tiny_model_dir] + TINY_FLAGS
    assert batch.main(argv) == 0
    paths = {n: out / f'{n:05d}.mp4' for n in range(1, 5)}
    before = {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in paths.items()}

    # line 1: file deleted; line 2: file corrupt; line 4: manifest entry cut mid-line (a crash)
    paths[1].unlink()
    paths[2].write_bytes(b'not a video')
    text = (out / 'manifest.jsonl').read_text()
    (out / 'manifest.jsonl').write_text(text[:-1 - len(text.splitlines()[-1]) // 2])
    generated.clear()
    assert batch.main(argv) == 0
    assert generated == ['line 1', 'line 2', 'line 4']
    assert (paths[3].stat().st_mtime_ns, paths[3].read_bytes()) == before[3]  # finished: untouched
    assert {n: probe_video(p)['frames'] for n, p in paths.items()} == {1: 2, 2: 2, 3: 2, 4: 2}
    entries = manifest(out / 'manifest.jsonl')  # every line parses: the fragment is gone
    assert [e['line'] for e in entries] == [1, 2, 3, 4]
    assert [e['parameters']['seed'] for e in entries] == [1, 2, 3, 4]

    generated.clear()
    capsys.readouterr()
    assert batch.main(argv) == 0
    assert generated == []
    assert '0 made, 4 already finished, 0 failed' in capsys.readouterr().err

    middle = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    assert batch.main(argv + ['--overwrite']) == 0
    assert generated == ['line 1', 'line 2', 'line 3', 'line 4']
    assert all(paths[n].stat().st_mtime_ns > middle[n] for n in paths)
    assert len(manifest(out / 'manifest.jsonl')) == 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_share_the_lines(tiny_model_dir, tmp_path):
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': f'line {n}', 'seed': n} for n in range(1, 5)])
    out = tmp_path / 'out'
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    env['OMP_NUM_THREADS'] = '1'
    cmd = [torchrun, '--nproc-per-node', '2', '--master-port', str(free_port()), '-m', 'modelscope_t2v.batch',
           prompts, '--out', str(out), '--model', tiny_model_dir] + TINY_FLAGS
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ' - modelscope - ' not in done.stderr   # ModelScope's start-up chatter (`initiate model from ...`)
    per_rank = [manifest(out / f'manifest.rank{r}.jsonl') for r in range(2)]
    assert [[e['line'] for e in entries] for entries in per_rank] == [[1, 3], [2, 4]]  # index % 2 == rank
    assert [{e['rank'] for e in entries} for entries in per_rank] == [{0}, {1}]
    merged = manifest(out / 'manifest.jsonl')
    assert [e['line'] for e in merged] == [1, 2, 3, 4]
    assert [e['parameters']['seed'] for e in merged] == [1, 2, 3, 4]
    assert [probe_video(out / f'{n:05d}.mp4')['frames'] for n in range(1, 5)] == [2, 2, 2, 2]


def test_outputs_are_checked_without_writing_anything(tmp_path):
    """Each rejected line is found while reading the file, and reading writes nothing: no folder of a
    rejected line (nor of an accepted one: those are made with their video)."""
    from modelscope_t2v.config import TINY
    out, elsewhere = tmp_path / 'out', tmp_path / 'elsewhere'
    out.mkdir()
    elsewhere.mkdir()
    (out / 'link').symlink_to(elsewhere)
    (out / 'taken.mp4').mkdir()
    (out / 'file').write_bytes(b'')
    lines = [{'text': 'a', 'output': 'link/escape.mp4'},        # a symlinked sub-folder leads outside --out
             {'text': 'b', 'output': 'new/sub/nul\0.mp4'},
             {'text': 'c', 'output': 'taken.mp4'},               # a folder in the way
             {'text': 'd', 'output': 'new/' + 'x' * 240 + '.mp4'},   # 244 bytes + 18 of the temporary name
             {'text': 'e', 'output': 'x' * 256 + '/a.mp4'},
             {'text': 'f', 'output': 'file/a.mp4'},
             {'text': 'g', 'output': 'rejected/a.mp4', 'height': 250},
             {'text': 'h', 'output': 'made/later/a.mp4'},
             {'text': 'i', 'output': 'link/../inside.mp4'}]    # normalised: inside --out
    items, bad = batch.read_items(write_lines(tmp_path / 'prompts.jsonl', lines), str(out), TINY, {})
    assert [(item.line, item.output) for item in items] == [(8, os.path.join('made', 'later', 'a.mp4')),
                                                             (9, 'inside.mp4')]
    reasons = dict(bad)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert f"would be written in '{elsewhere}', outside --out" in reasons[1]
    assert 'holds a NUL character' in reasons[2]
    assert "taken.mp4' is a folder, not a file name" in reasons[3]
    assert 'is 244 bytes long; the file system of' in reasons[4] and 'at most 237' in reasons[4]
    assert 'is 256 bytes long; the file system of' in reasons[5]
    assert "file' is a file, not a folder" in reasons[6]
    assert 'height=250 is not a multiple of 8' in reasons[7]
    assert sorted(os.listdir(out)) == ['file', 'link', 'taken.mp4'] and os.listdir(elsewhere) == []


def test_a_stale_manifest_partial_of_a_killed_run_is_removed(tmp_path):
    import time
    stale, fresh = tmp_path / 'manifest.jsonl.partial-4242', tmp_path / 'manifest.jsonl.partial-4343'
    for path, age in ((stale, 7200), (fresh, 60)):
        path.write_text('{"line": 1')
        os.utime(path, (time.time() - age, time.time() - age))
    batch.append_entry(str(tmp_path / 'manifest.rank0.jsonl'), {'line': 1, 'finished_at': 1.0})
    assert list(batch.merge_manifests(str(tmp_path), remove_rank_files=True)) == [1]
    assert sorted(os.listdir(tmp_path)) == ['manifest.jsonl', 'manifest.jsonl.partial-4343']


def test_a_file_is_written_while_the_next_video_is_made(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Line 1's file waits until line 2's generation has started: a batch that wrote before generating the next
    video would stop here (the wait times out and the line fails). The files are the pipeline's own: the
    parameters in their comment, as a pipeline call with output_video writes them."""
    from modelscope.pipelines import pipeline
    from modelscope_t2v import video_io
    second_started, call, write = threading.Event(), TextToVideo.__call__, video_io.write_video

    def generating(self, request):
        if 'line 2' in request.prompts:
            second_started.set()
        return call(self, request)

    def writing(frames, path, **options):
        if path.endswith('00001.mp4') and not second_started.wait(timeout=60):
            raise TimeoutError('line 2 was not started while line 1 was written')
        return write(frames, path, **options)

    monkeypatch.setattr(TextToVideo, '__call__', generating)
    monkeypatch.setattr(video_io, 'write_video', writing)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': f'line {n}', 'seed': n} for n in (1, 2)])
    out = tmp_path / 'out'
    assert batch.main([prompts, '--out', str(out), '--model', tiny_model_dir] + TINY_FLAGS) == 0, capsys.readouterr()
    entries = manifest(out / 'manifest.jsonl')
    assert [e['line'] for e in entries] == [1, 2]
    alone = pipeline('text-to-video-synthesis', tiny_model_dir, device='cpu')(
        {'text': 'line 1'}, seed=1, num_frames=2, height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
        output_video=str(tmp_path / 'alone.mp4'))
    assert probe_video(out / '00001.mp4') == probe_video(alone['output_video'])   # codec, size, frames, comment
    assert json.loads(probe_video(out / '00001.mp4')['comment']) == entries[0]['parameters']
    assert (video_io.read_frames(out / '00001.mp4') == video_io.read_frames(alone['output_video'])).all()


def test_a_file_that_cannot_be_written_fails_its_line_only(tiny_model_dir, tmp_path, generated, monkeypatch, capsys):
    from modelscope_t2v import video_io
    write = video_io.write_video

    def writing(frames, path, **options):
        if path.endswith('00002.mp4'):
            raise OSError(28, 'No space left on device')
        return write(frames, path, **options)

    monkeypatch.setattr(video_io, 'write_video', writing)
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': f'line {n}', 'seed': n} for n in (1, 2, 3)])
    out = tmp_path / 'out'
    assert batch.main([prompts, '--out', str(out), '--model', tiny_model_dir] + TINY_FLAGS) == batch.EXIT_SOME_FAILED
    assert 'line 2: failed: OSError: [Errno 28] No space left on device' in capsys.readouterr().err
    assert generated == ['line 1', 'line 2', 'line 3']
    assert [e['line'] for e in manifest(out / 'manifest.jsonl')] == [1, 3]
    assert sorted(os.listdir(out)) == ['00001.mp4', '00003.mp4', 'manifest.jsonl']


@pytest.mark.parametrize('flag, shapes, videos, compiles', [
    (None, [(16, 256, 256)], 33, False), (None, [(16, 256, 256)], 34, True),
    (None, [(16, 256, 256), (24, 320, 576)], 67, False), (None, [(16, 256, 256), (24, 320, 576)], 68, True),
    (True, [(16, 256, 256)], 1, True), (False, [(16, 256, 256)], 1000, False)])
def test_a_batch_compiles_when_it_pays_back(monkeypatch, capsys, flag, shapes, videos, compiles):
    import torch
    from types import SimpleNamespace
    from modelscope_t2v import pipeline
    monkeypatch.setattr(pipeline, 'torch_device', lambda name: torch.device('cuda'))
    todo = [SimpleNamespace(request=SimpleNamespace(num_frames=f, height=h, width=w))
            for i in range(videos) for f, h, w in [shapes[i % len(shapes)]]]
    assert batch.compile_pays_back(SimpleNamespace(compile=flag, device='gpu'), todo) is compiles
    said = capsys.readouterr().err
    if flag is None:   # the choice is announced
        assert f'{videos} videos in {len(shapes)} shape(s): ' in said
        assert ('compiling pays back' in said) is compiles and ('not compiling' in said) is not compiles
    else:
        assert said == ''


def test_a_batch_on_the_cpu_never_compiles(capsys):
    from types import SimpleNamespace
    todo = [SimpleNamespace(request=SimpleNamespace(num_frames=16, height=256, width=256))] * 500
    assert batch.compile_pays_back(SimpleNamespace(compile=None, device='cpu'), todo) is False
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('flags, compiles, keeps', [([], True, True), (['--compile'], True, False),
                                                    (['--compile-cache'], True, True),
                                                    (['--no-compile'], False, False)])
def test_a_batch_that_chooses_to_compile_keeps_it_in_the_compile_cache(tiny_model_dir, tmp_path, monkeypatch,
                                                                          flags, compiles, keeps):
    """Its own choice (enough videos a shape) compiles through the compile cache, whose artefacts a later job loads;
    --compile alone is torch.compile, as asked."""
    loaded = []

    def load_pipeline(args):
        loaded.append((args.compile, args.compile_cache))
        raise RuntimeError('stopped before the model is read')

    monkeypatch.setattr(batch, 'load_pipeline', load_pipeline)
    monkeypatch.setattr(batch, 'compile_pays_back', lambda args, todo: True if args.compile is None
                        else bool(args.compile))
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': 'a panda', 'seed': 1}])
    assert batch.main([prompts, '--out', str(tmp_path / 'out'), '--model', tiny_model_dir] + flags) != 0
    assert loaded == [(compiles, keeps)]


def item(line, seed=None, sampler='ddim', eta=0.0, **values):
    from types import SimpleNamespace
    values = {'text': f'line {line}', 'seed': seed if seed is not None else line, 'output': f'{line:05d}.mp4',
              'sampler': sampler, 'eta': eta, **values}
    return SimpleNamespace(line=line, values=values, request=SimpleNamespace(sampler=sampler, eta=eta))


def test_lines_of_equal_options_are_planned_together_and_a_short_last_call_is_padded():
    from modelscope_t2v.batch_calls import plan_calls
    items = [item(1), item(2, negative_prompt='blur'), item(3, num_frames=24), item(4), item(5, eta=0.5),
             item(6), item(7, sampler='euler-a'), item(8, num_frames=24), item(9, eta=0.5), item(10, seed=1)]
    calls = plan_calls(items, 2)
    assert [([i.line for i in c.items], c.padding) for c in calls] == [   # 5, 7 and 9 draw step noise: alone
        ([1, 2], 0), ([3, 8], 0), ([4, 6], 0), ([5], 0), ([7], 0), ([9], 0), ([10], 1)]
    assert [i.line for i in calls[-1].rows] == [10, 10]
    assert [([i.line for i in c.items], c.padding) for c in plan_calls(items, 1)] == [([n], 0) for n in range(1, 11)]
    assert [([i.line for i in c.items], c.padding) for c in plan_calls(items, 8)][:2] == [([1, 2, 4, 6, 10], 0),
                                                                                           ([3, 8], 0)]


def test_lines_made_two_to_a_call_are_the_videos_each_line_makes_alone(tiny_model_dir, tmp_path, generated, capsys):
    """Lines 1 and 2 share one call, 4 (of their options too) a call padded with its copy; 3 (other frames) and 5
    (eta > 0: step noise from its seed) are made alone.
    Each video is the one its line makes alone, within 1 uint8 level in the decoded mp4 (float32 on the CPU: the
    batch only changes the matmuls' summation order), and its manifest has the line's seed."""
    from modelscope_t2v import video_io
    lines = [{'text': 'line 1', 'seed': 11}, {'text': 'line 2', 'seed': 5, 'negative_prompt': 'blur'},
             {'text': 'line 3', 'seed': 3, 'num_frames': 3}, {'text': 'line 4', 'seed': 11},
             {'text': 'line 5', 'seed': 4, 'eta': 0.5}]
    prompts = write_lines(tmp_path / 'prompts.jsonl', lines)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f'out{n}'
        generated.clear()
        assert batch.main([prompts, '--out', str(out), '--model', tiny_model_dir, '--videos-per-call', str(n)]
                          + TINY_FLAGS) == 0, capsys.readouterr().err
        runs[n] = (list(generated), manifest(out / 'manifest.jsonl'),
                   {k: video_io.read_frames(out / f'{k:05d}.mp4').astype(int) for k in range(1, 6)})
    assert runs[1][0] == [f'line {k}' for k in range(1, 6)]
    assert runs[2][0] == ['line 1', 'line 2', 'line 3', 'line 4', 'line 4', 'line 5']   # 1 and 2 paired, 4 padded
    for one, two in zip(runs[1][1], runs[2][1]):
        assert one['parameters'] == two['parameters'] and one['request'] == two['request']
    assert [e['parameters']['seed'] for e in runs[2][1]] == [11, 5, 3, 11, 4]
    assert [runs[2][2][k].shape[0] for k in range(1, 6)] == [2, 2, 3, 2, 2]
    assert all(abs(runs[1][2][k] - runs[2][2][k]).max() <= 1 for k in range(1, 6))
    assert abs(runs[2][2][1] - runs[2][2][2]).max() > 10   # the rows are not one video twice


def test_lines_that_fail_together_are_made_again_alone(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Line 2 fails in any call (a NaN, say): made together with line 1, both fail; line 1 alone then succeeds,
    and lines 3 and 4, of the same options, are made one at a time too."""
    made, call = [], TextToVideo.__call__

    def failing(self, request):
        made.append(request.prompts)
        if 'line 2' in request.prompts:
            raise RuntimeError('line 2 decoded NaN')
        return call(self, request)

    monkeypatch.setattr(TextToVideo, '__call__', failing)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': f'line {n}', 'seed': n} for n in (1, 2, 3, 4)])
    out = tmp_path / 'out'
    status = batch.main([prompts, '--out', str(out), '--model', tiny_model_dir, '--videos-per-call', '2']
                        + TINY_FLAGS)
    err = capsys.readouterr().err
    assert status == batch.EXIT_SOME_FAILED
    assert made == [('line 1', 'line 2'), ('line 1',), ('line 2',), ('line 3',), ('line 4',)]
    assert err.count('made together failed') == 1
    assert ('lines 1, 2 made together failed (RuntimeError: line 2 decoded NaN); making them and the later lines '
            'of these options one at a time') in err
    assert 'line 2: failed: RuntimeError: line 2 decoded NaN' in err and 'line 1: failed' not in err
    assert [e['line'] for e in manifest(out / 'manifest.jsonl')] == [1, 3, 4]
    assert sorted(os.listdir(out)) == ['00001.mp4', '00003.mp4', '00004.mp4', 'manifest.jsonl']


@pytest.mark.parametrize('value, reason', [('0', '0 is outside 1-16'), ('17', '17 is outside 1-16'),
                                           ('two', "'two' is not a whole number")])
def test_a_bad_videos_per_call_is_refused_before_loading(tmp_path, capsys, value, reason):
    prompts = write_lines(tmp_path / 'prompts.jsonl', [{'text': 'a panda'}])
    with pytest.raises(SystemExit) as stopped:
        batch.main([prompts, '--out', str(tmp_path / 'out'), '--videos-per-call', value])
    assert stopped.value.code == 2
    assert f'--videos-per-call: {reason}' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flag, device, expected', [(None, 'cuda', 2), (None, 'cpu', 1), (4, 'cpu', 4),
                                                    (1, 'cuda', 1)])
def test_two_videos_a_call_on_cuda_unless_told(monkeypatch, flag, device, expected):
    import torch
    from types import SimpleNamespace
    from modelscope_t2v import pipeline
    monkeypatch.setattr(pipeline, 'torch_device', lambda name: torch.device(device))
    assert batch.videos_per_call(SimpleNamespace(videos_per_call=flag, device='gpu')) == expected
