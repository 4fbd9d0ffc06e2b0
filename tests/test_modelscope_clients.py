"""ModelScope client code as people run it: ModelScope's own test of this pipeline, the Studio
app's seeding, the serving helpers and scripts that use ModelScope's own model class.

The calls are the clients' own; only the model is a tiny random one. Its configuration asks for
2 frames, so a call with the built-in's defaults (256x256, DDIM 50, guidance 9) takes seconds.
"""

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import modelscope_t2v  # noqa: F401  (registers the plugin)
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from modelscope_t2v.config import TINY, replace
from modelscope_t2v.pipeline import TextToVideoPipeline
from modelscope_t2v.tools.make_random_model import write_model_dir
from modelscope_t2v.video_io import probe_video, read_frames

PROMPT = 'A panda eating bamboo on a rock.'
SMALL = dict(num_frames=2, height=64, width=64, num_inference_steps=3)
HUB_ID = 'damo/text-to-video-synthesis'   # the id ModelScope's test loads; here a local folder of that name


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder holding the tiny model at ./damo/text-to-video-synthesis, 2 frames by default."""
    root = tmp_path_factory.mktemp('client')
    write_model_dir(str(root / HUB_ID), replace(TINY, max_frames=2))
    return root


@pytest.fixture(scope='module')
def pipe(workdir):
    return pipeline('text-to-video-synthesis', str(workdir / HUB_ID), device='cpu')


def test_modelscopes_own_test_runs_as_written(workdir, monkeypatch, caplog, capsys):
    """tests/pipelines/test_text_to_video_synthesis.py of ModelScope: its two tests' calls, in order."""
    monkeypatch.chdir(workdir)   # where ModelScope's model id names a local folder
    # (pipeline() first asks ModelScope's hub whether the id's owner is trusted; offline that fails
    # after its retries, about 16 s a call)
    caplog.set_level(logging.WARNING, logger='modelscope_t2v')
    paths = []
    for test_text in ({'text': PROMPT}, {'text': PROMPT, 'out_height': 256, 'out_width': 256}):
        pipe_line_text_to_video_synthesis = pipeline(task=Tasks.text_to_video_synthesis, model=HUB_ID)
        output_video_path = pipe_line_text_to_video_synthesis(test_text)[OutputKeys.OUTPUT_VIDEO]
        print(output_video_path)
        paths.append(output_video_path)
    assert capsys.readouterr().out.split() == paths
    for path in paths:
        info = probe_video(path)
        assert {k: info[k] for k in ('codec', 'pix_fmt', 'frames', 'fps', 'width', 'height')} == dict(
            codec='h264', pix_fmt='yuv420p', frames=2, fps=8.0, width=256, height=256)
    ignored = [r.getMessage() for r in caplog.records if 'ignoring unknown' in r.getMessage()]
    assert len(ignored) == 1 and "['out_height', 'out_width']" in ignored[0]


def test_studio_app_seeds_with_torch_manual_seed(pipe):
    """The Studio app / Space: torch.manual_seed(seed), then the call; the path goes to gr.Video."""
    import gradio as gr

    def generate(prompt: str, seed: int) -> str:
        torch.manual_seed(seed)
        return pipe({'text': prompt})[OutputKeys.OUTPUT_VIDEO]

    first, again, other = generate(PROMPT, 7), generate(PROMPT, 7), generate(PROMPT, 8)
    frames = [read_frames(path) for path in (first, again, other)]
    assert frames[0].shape == (2, 256, 256, 3)
    assert np.array_equal(frames[0], frames[1])
    assert np.abs(frames[0].astype(int) - frames[2]).mean() > 1.0
    served = gr.Video().postprocess(first)
    assert np.array_equal(read_frames(served.path), frames[0])   # the file the page plays


def test_global_generator_draws_as_the_builtin_and_reports_a_seed_only_when_exact(pipe):
    shape = (1, 4, 2, 8, 8)   # (1, c, f, h/8, w/8) of SMALL, one torch.randn per call as the built-in
    torch.manual_seed(5)
    first_draw, second_draw = torch.randn(shape), torch.randn(shape)
    run = lambda **options: pipe({'text': PROMPT}, output_type='latents', **SMALL, **options)  # noqa: E731

    torch.manual_seed(5)
    first, second = run(), run()   # one seed, two calls: the second continues the global stream
    assert torch.equal(first['latents'], run(latents=first_draw)['latents'])
    assert torch.equal(second['latents'], run(latents=second_draw)['latents'])
    assert first['parameters']['seed'] == 5 and second['parameters']['seed'] is None
    assert torch.equal(first['latents'], run(seed=5)['latents'])   # the reported seed makes it again

    torch.manual_seed(5)
    noisy = run(eta=0.5)   # DDIM adds noise of its own: the seed alone would not make it again
    assert noisy['parameters']['seed'] is None
    assert not torch.equal(noisy['latents'], first['latents'])


def test_unknown_keys_are_ignored_with_one_warning_and_known_ones_still_checked(pipe, caplog):
    caplog.set_level(logging.WARNING, logger='modelscope_t2v')
    for _ in range(2):
        out = pipe({'text': PROMPT, 'seed': 1, 'out_fps': 3, 'size': 'large'}, upscale=2, output_type='frames',
                   **SMALL)
    assert out['frames'].shape == (2, 64, 64, 3)
    ignored = [r.getMessage() for r in caplog.records if 'ignoring unknown' in r.getMessage()]
    assert len(ignored) == 1 and "['out_fps', 'size', 'upscale']" in ignored[0]
    with pytest.raises(ValueError, match=r'num_frames=0 is outside the valid range 1\.\.1024'):
        pipe({'text': PROMPT, 'num_frames': 0, 'out_fps': 3})


def test_sizes_are_rounded_down_to_multiples_of_8_as_the_builtin(pipe, caplog):
    caplog.set_level(logging.WARNING, logger='modelscope_t2v')
    out = pipe({'text': PROMPT, 'seed': 1, 'height': 70, 'width': 100}, output_type='frames',
               num_frames=1, num_inference_steps=2)
    assert out['frames'].shape == (1, 64, 96, 3)
    assert (out['parameters']['height'], out['parameters']['width']) == (64, 96)
    messages = [r.getMessage() for r in caplog.records]
    assert 'height=70 rounded down to 64' in ' '.join(messages) and 'width=100 rounded down to 96' in ' '.join(messages)
    with pytest.raises(ValueError, match=r'height=5 is outside the valid range 8\.\.4096'):
        pipe({'text': PROMPT, 'height': 5})


@pytest.mark.parametrize('ext, codec', [('.mp4', 'h264'), ('.mkv', 'h264'), ('.mov', 'h264')])
def test_output_video_comes_back_as_given(pipe, tmp_path, monkeypatch, ext, codec):
    monkeypatch.chdir(tmp_path)
    relative = pipe({'text': PROMPT, 'seed': 1}, output_video=f'./clip{ext}', **SMALL)[OutputKeys.OUTPUT_VIDEO]
    assert relative == f'./clip{ext}' and isinstance(relative, str)
    given = tmp_path / f'path{ext}'
    assert pipe({'text': PROMPT, 'seed': 1}, output_video=given, **SMALL)[OutputKeys.OUTPUT_VIDEO] is given
    for path in (relative, given):
        info = probe_video(path)
        assert (info['codec'], info['pix_fmt'], info['frames'], info['width']) == (codec, 'yuv420p', 2, 64)
        assert json.loads(info['comment'])['seed'] == 1


def test_serving_helpers_return_a_base64_mp4(pipe, tmp_path):
    """What `modelscope server` runs for a request: call_pipeline_with_json, then the base64 output."""
    from modelscope.utils.input_output import (call_pipeline_with_json, get_pipeline_information_by_pipeline,
                                               pipeline_output_to_service_base64_output)
    info = get_pipeline_information_by_pipeline(pipe)
    for videos in (1, 2):
        body = {'input': {'text': PROMPT}, 'parameters': {**SMALL, 'seed': 3, 'num_videos_per_prompt': videos}}
        result = call_pipeline_with_json(info, pipe, body)
        response = json.loads(json.dumps(pipeline_output_to_service_base64_output(info['task_name'], result)))
        encoded = response[OutputKeys.OUTPUT_VIDEO]
        encoded = [encoded] if videos == 1 else encoded
        assert len(encoded) == videos
        for i, text in enumerate(encoded):
            path = tmp_path / f'served-{videos}-{i}.mp4'
            path.write_bytes(base64.b64decode(text))
            probed = probe_video(path)
            assert (probed['codec'], probed['frames'], probed['width']) == ('h264', 2, 64)
            assert json.loads(probed['comment'])['seed'] == 3 + i   # video i of a batch: seed + i
        temporary = result[OutputKeys.OUTPUT_VIDEO]
        assert not any(os.path.exists(p) for p in ([temporary] if videos == 1 else temporary))


def run_script(code: str, *args) -> str:
    """Run Python `code` in a fresh interpreter (the import order of a real script); its stdout."""
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], capture_output=True,
                            text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


BUILD_AND_REPORT = '''
    import sys
    from modelscope.pipelines import pipeline
    pipe = pipeline('text-to-video-synthesis', sys.argv[1], device='cpu')
    out = pipe({'text': 'a cat', 'seed': 1}, num_frames=1, height=64, width=64, num_inference_steps=1)
    print(type(pipe).__name__, type(pipe.model).__name__, out['parameters']['seed'])
'''


@pytest.mark.parametrize('imports', [
    # ModelScope's model class after the plugin, then before it
    'import modelscope_t2v\nfrom modelscope.models.multi_modal import TextToVideoSynthesis',
    'from modelscope.models.multi_modal import TextToVideoSynthesis\nimport modelscope_t2v',
    # its pipeline class too, where opencv (which that module imports) is installed: a stand-in here
    'import importlib.machinery, sys, types\ncv2 = types.ModuleType("cv2")\n'
    'cv2.__spec__ = importlib.machinery.ModuleSpec("cv2", None)\nsys.modules["cv2"] = cv2\n'
    'import modelscope_t2v\nfrom modelscope.pipelines.multi_modal import TextToVideoSynthesisPipeline',
], ids=['plugin-first', 'builtin-first', 'builtin-pipeline-after'])
def test_both_import_orders_build_our_pipeline(workdir, imports):
    out = run_script(imports + '\n' + textwrap.dedent(BUILD_AND_REPORT), str(workdir / HUB_ID))
    assert out.split()[-3:] == ['TextToVideoPipeline', 'TextToVideoModel', '1']


def test_importing_the_package_leaves_modelscope_to_the_program():
    """ModelScope's import (seconds) happens when the program asks for it, and registers our classes then."""
    out = run_script('''
        import sys
        import modelscope_t2v
        print('modelscope' in sys.modules)
        from modelscope.pipelines.builder import PIPELINES
        print(PIPELINES.modules['text-to-video-synthesis']['latent-text-to-video-synthesis'].__module__)
    ''')
    assert out.split() == ['False', 'modelscope_t2v.pipeline']


def test_model_from_builtin_from_pretrained_is_ours(workdir, pipe):
    from modelscope.models.multi_modal import TextToVideoSynthesis
    model = TextToVideoSynthesis.from_pretrained(str(workdir / HUB_ID), device='cpu')
    served = pipeline(Tasks.text_to_video_synthesis, model=model, device='cpu')
    assert isinstance(served, TextToVideoPipeline) and served.model is model
    a = served({'text': PROMPT, 'seed': 4}, output_type='frames', **SMALL)['frames']
    assert np.array_equal(a, pipe({'text': PROMPT, 'seed': 4}, output_type='frames', **SMALL)['frames'])


def test_model_built_by_the_builtin_class_is_served_over_its_tensors(tmp_path, monkeypatch):
    """TextToVideoSynthesis(model_dir) as ModelScope builds it, its hard-coded ViT-H-14 and 84M-parameter
    autoencoder shrunk to the tiny model's; then pipeline(task, model=it)."""
    import open_clip
    from modelscope.models.multi_modal import TextToVideoSynthesis
    from modelscope.models.multi_modal.video_synthesis import text_to_video_synthesis_model as builtin_module
    from reference import reference_autoencoder, reference_clip

    # UNetSD's decoder hard-codes a 1024-wide text context: a tiny model with a 1024-wide text tower
    config = replace(TINY, unet=replace(TINY.unet, context_dim=1024), max_frames=2,
                     text=replace(TINY.text, width=1024, heads=16, layers=2))
    model_dir = write_model_dir(str(tmp_path / 'wide'), config)

    def tiny_clip(arch, device, pretrained):
        clip = reference_clip(config.text)
        state = torch.load(pretrained, weights_only=True)
        clip.load_state_dict({k: v for k, v in state.items() if k.startswith(
            ('token_', 'positional_', 'transformer.', 'ln_final'))}, strict=False)
        return clip, None, None

    monkeypatch.setattr(open_clip, 'create_model_and_transforms', tiny_clip)
    monkeypatch.setattr(builtin_module, 'AutoencoderKL',
                        lambda ddconfig, embed_dim, ckpt: reference_autoencoder(config.autoencoder, ckpt))
    builtin = TextToVideoSynthesis(model_dir, device='cpu')
    served = pipeline(Tasks.text_to_video_synthesis, model=builtin, device='cpu')
    assert isinstance(served, TextToVideoPipeline)
    unet = served.model.engine.unet
    assert unet.out[2].weight.data_ptr() == builtin.sd_model.out[2].weight.data_ptr()   # the same tensors
    from_files = pipeline(Tasks.text_to_video_synthesis, model_dir, device='cpu')
    a, b = (p({'text': PROMPT, 'seed': 4}, output_type='frames', **SMALL)['frames'] for p in (served, from_files))
    assert np.array_equal(a, b)
