"""The command line as a user runs it: exit status, one-line errors, the file it writes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from modelscope_t2v.hub import DEFAULT_MODEL, ModelNotFound, resolve_model_dir
from modelscope_t2v.video_io import probe_video

SMALL = ['--num-frames', '4', '--height', '64', '--width', '64', '--steps', '2', '--device', 'cpu']


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'modelscope_t2v', *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def test_generates_the_named_file(tiny_model_dir, tmp_path):
    out = tmp_path / 'panda.webm'
    result = run_cli('A panda eating bamboo on a rock.', '-o', str(out), '--model', tiny_model_dir,
                     '--seed', '3', '--fps', '12', *SMALL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert ' - modelscope - ' not in result.stderr   # ModelScope's start-up chatter (`initiate model from ...`)
    info = probe_video(out)
    assert (info['codec'], info['frames'], info['fps'], info['width']) == ('vp9', 4, 12.0, 64)
    assert '"seed": 3' in info['comment']


def test_without_seed_a_random_one_is_drawn_and_reported(tiny_model_dir, tmp_path):
    """Not torch's global generator, whose default seed (67280421310721) would give every run the same video."""
    out = tmp_path / 'a.mp4'
    result = run_cli('a red kite', '-o', str(out), '--model', tiny_model_dir, *SMALL)
    assert result.returncode == 0, result.stderr
    seed = json.loads(probe_video(out)['comment'])['seed']
    assert isinstance(seed, int) and 0 <= seed < 2 ** 31


@pytest.mark.parametrize('args,message', [
    (['--height', '250'], 'height=250 is not a multiple of 8'),
    (['--steps', '0'], 'num_inference_steps=0 is outside the valid range 1..1000'),
    (['-o', '/no/such/folder/x.mp4'], "output_video='/no/such/folder/x.mp4'"),
])
def test_bad_values_fail_fast_with_one_line(args, message, tiny_model_dir):
    result = run_cli('a prompt', '--model', tiny_model_dir, '--device', 'cpu', *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('modelscope-t2v: error:') and message in lines[0]


def test_offline_hub_id_says_how_to_pass_a_local_dir():
    result = run_cli('a prompt', '--model', 'someone/some-model', env={'HF_HUB_OFFLINE': '1'})
    assert result.returncode == 2
    assert 'pass a local model dir' in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_documents_defaults_and_ranges():
    result = run_cli('--help', env={'COLUMNS': '300'})
    assert result.returncode == 0
    for text in (DEFAULT_MODEL, 'default: 50', 'default: 9.0', 'multiple of 8', 'dpm++2m-karras'):
        assert text in result.stdout


def test_resolve_model_dir(tiny_model_dir, tmp_path):
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ModelNotFound, match='is a folder without a model: it holds neither configuration.json'):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelNotFound, match='neither an existing folder nor a hub id'):
        resolve_model_dir('./missing/model/dir')
    with pytest.raises(ValueError, match="hub='elsewhere'"):
        resolve_model_dir('owner/name', hub='elsewhere')


@pytest.mark.parametrize('command', [['modelscope_t2v', 'a prompt'], ['modelscope_t2v.batch', 'prompts.jsonl',
                                                                       '--out', 'videos']], ids=['generate', 'batch'])
def test_ctrl_c_during_start_up_exits_130_with_one_line(command, tiny_model_dir, tmp_path):
    """SIGINT 1 s after the start, while the package imports torch and ModelScope (7 s on the 2-core CPU)."""
    process = subprocess.Popen([sys.executable, '-m', *command, '--model', tiny_model_dir, '--device', 'cpu'],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, '', 'modelscope-t2v: interrupted\n')


def test_bad_device_is_a_user_error(tiny_model_dir):
    result = run_cli('a prompt', '--model', tiny_model_dir, '--device', 'bogus')
    assert result.returncode == 2
    assert result.stderr == ("modelscope-t2v: error: device='bogus' is not one of cpu, gpu, cuda, gpu:N, cuda:N "
                             '(N: the index of a GPU)\n')


@pytest.mark.parametrize('flags, mode', [([], False), (['--no-compile'], False), (['--compile'], 'reduce-overhead'),
                                         (['--compile', '--compile-mode', 'default'], 'default')])
def test_compile_flag_defaults_to_cuda_graphs(flags, mode):
    from modelscope_t2v.cli import build_parser, compile_mode
    assert compile_mode(build_parser().parse_args([*flags, 'a kite'])) == mode


@pytest.mark.parametrize('flags', [['--compile-cache'], ['--compile', '--compile-cache']])
def test_compile_cache_flag_compiles(flags):
    from modelscope_t2v.cli import apply_compile_flags, build_parser, compile_mode
    parser = build_parser()
    args = parser.parse_args([*flags, 'a kite'])
    apply_compile_flags(parser, args)
    assert (args.compile, args.compile_cache, compile_mode(args)) == (True, True, 'reduce-overhead')


def test_compile_cache_without_compiling_is_a_user_error():
    result = run_cli('a kite', '--no-compile', '--compile-cache', '--device', 'cpu')
    assert result.returncode == 2
    assert result.stderr.endswith('error: --compile-cache keeps compiled networks: it cannot go with --no-compile\n')


@pytest.mark.parametrize('flags, graphs', [([], True), (['--no-compile'], True), (['--no-cuda-graphs'], False),
                                           (['--compile'], False), (['--compile-cache'], False)])
def test_uncompiled_networks_replay_cuda_graphs_by_default(flags, graphs):
    """Without compiling, the CLI replays CUDA graphs unless --no-cuda-graphs: the same frames from the first video
    on, 17 % faster on an H200 (docs/benchmarks.md)."""
    from modelscope_t2v.cli import apply_compile_flags, build_parser, replays_graphs
    parser = build_parser()
    args = parser.parse_args([*flags, 'a kite'])
    apply_compile_flags(parser, args)
    assert replays_graphs(args) is graphs


@pytest.mark.parametrize('flags, graphs, said', [
    ([], True, 'modelscope-t2v: replaying the networks from CUDA graphs, captured on the first video of each size\n'),
    (['--no-cuda-graphs'], False, '')])
def test_the_pipeline_gets_cuda_graphs_and_stderr_says_so(tiny_model_dir, monkeypatch, capsys, flags, graphs, said):
    import modelscope.pipelines
    import torch
    from modelscope_t2v import cli, pipeline
    monkeypatch.setattr(pipeline, 'torch_device', lambda name: torch.device('cuda'))
    monkeypatch.setattr(cli, 'resolve_models', lambda args: (args.model, None))
    asked = []
    monkeypatch.setattr(modelscope.pipelines, 'pipeline', lambda task, model, **options: asked.append(options))
    parser = cli.build_parser()
    args = parser.parse_args([*flags, '--model', tiny_model_dir, 'a kite'])
    cli.apply_compile_flags(parser, args)
    cli.load_pipeline(args)
    assert (asked[0]['cuda_graphs'], asked[0]['compile_unet']) == (graphs, False)
    assert capsys.readouterr().err == said


def test_cuda_graphs_flag_rules_compiling_out():
    """--cuda-graphs replays the uncompiled networks: no compiling (a batch job then never compiles by itself),
    and pipeline()'s cuda_graphs=True."""
    from modelscope_t2v.cli import apply_compile_flags, build_parser, compile_mode
    parser = build_parser()
    args = parser.parse_args(['--cuda-graphs', 'a kite'])
    apply_compile_flags(parser, args)
    assert (args.compile, args.cuda_graphs, compile_mode(args)) == (False, True, False)


@pytest.mark.parametrize('flag', ['--compile', '--compile-cache'])
def test_cuda_graphs_with_compiling_is_a_user_error(flag):
    result = run_cli('a kite', flag, '--cuda-graphs', '--device', 'cpu')
    assert result.returncode == 2
    assert result.stderr.endswith('error: --cuda-graphs replays the uncompiled networks: it cannot go with --compile '
                                  'or --compile-cache (--compile-mode reduce-overhead gives compiled networks CUDA '
                                  'graphs)\n')


def test_compile_mode_refuses_a_mode_torch_compile_lacks():
    result = run_cli('a kite', '--compile', '--compile-mode', 'fastest', '--device', 'cpu')
    assert result.returncode == 2
    assert "invalid choice: 'fastest'" in result.stderr and 'reduce-overhead' in result.stderr


@pytest.mark.parametrize('caught_as', ['ModuleNotFoundError', 'nothing'])
def test_a_ctrl_c_that_an_import_catches_still_ends_the_command_with_130(monkeypatch, capsys, caught_as):
    """transformers' lazy modules turn a Ctrl-C during their imports into ModuleNotFoundError; other imports
    swallow it. Either way the command stops as interrupted (after the imports: stop_if_interrupted)."""
    from modelscope_t2v import cli
    monkeypatch.setattr(cli, '_interrupts', [])
    steps = []

    def command(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            if caught_as == 'ModuleNotFoundError':
                raise ModuleNotFoundError("Could not import module 'PreTrainedModel'")
        cli.stop_if_interrupted()
        steps.append('generated')   # never reached
        return 0

    assert cli.guarded(command, []) == 130
    assert capsys.readouterr().err == 'modelscope-t2v: interrupted\n' and steps == []
    assert signal.getsignal(signal.SIGINT) is not cli.remember_interrupt   # the caller's handler is back
