"""Gradio demo for ModelScope Studio and Hugging Face Spaces: a prompt in, an mp4 that plays in the page.

    python demo/app.py --model ./weights        # or MODELSCOPE_T2V_MODEL=./weights python demo/app.py

The ModelScope pipeline is loaded once; each widget is one pipeline option and the
parameters a video was made with are shown under it. No generation logic lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import gradio as gr

from modelscope_t2v import NonFiniteError  # importing the package registers the pipeline in ModelScope
from modelscope_t2v.cli import COMPILE_HELP, compile_mode, replays_graphs
from modelscope_t2v.hub import DEFAULT_MODEL, HUBS, resolve_model_dir
from modelscope_t2v.text_to_video import COMPILE_MODES, FAST_COMPILE_MODE
from modelscope_t2v.schedulers import SAMPLERS

EXAMPLES = [
    'A panda eating bamboo on a rock.',
    'An astronaut riding a horse on the moon.',
    'A goldfish swimming in a glass bowl, close-up.',
    'Waves crashing on a rocky beach at sunset.',
]
QUEUE_SIZE = 16  # waiting requests beyond this are turned away with "queue full"


def new_seed() -> int:
    """A random seed for the seed box (the pipeline's own random seeds are below 2**31 too)."""
    return secrets.randbelow(2 ** 31)


class GenerationThread:
    """Runs every generation on one thread, whichever of Gradio's worker threads asks. torch keeps the compiled
    path's CUDA graphs per thread: generations from a pool of threads would record them again in each, each
    with its own graph memory. The caller's context goes along (Gradio's progress bar reads it)."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix='generation')

    def run(self, fn, *args, **kwargs):
        return self.executor.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()


def warm_up(pipe, thread: GenerationThread) -> None:
    """Compile before serving: one default video on the generation thread, so no visitor waits minutes for
    it. Then a request of another shape (frames, guidance off) runs eager rather than compiling again
    (TextToVideo.stop_compiling): each new shape would cost a visitor minutes."""
    print('demo: compiling the networks on a default video before serving: about 3 minutes, under a minute '
          'when an earlier run left the compiler caches (without --compile it serves at once)', file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    thread.run(pipe, {'text': EXAMPLES[0]}, output_type='frames')
    pipe.model.engine.stop_compiling()
    print(f'demo: compiled in {time.perf_counter() - start:.0f} s; requests of other shapes run eager',
          file=sys.stderr, flush=True)


def load_pipeline(model: str, hub: str = 'huggingface', device: str = 'gpu', base_model: str | None = None,
                  compile: str | bool = False, compile_cache: bool = False, cuda_graphs: bool = False):
    """The ModelScope text-to-video pipeline over a local model dir or a hub id (downloaded once), in either
    layout; `base_model` supplies what a partial original-format folder lacks; `compile` a torch.compile mode,
    `compile_cache` and `cuda_graphs` TextToVideo.from_pretrained's."""
    from modelscope.pipelines import pipeline
    base = resolve_model_dir(base_model, hub) if base_model else None
    return pipeline('text-to-video-synthesis', resolve_model_dir(model, hub), device=device, base_model=base,
                    compile_unet=compile, compile_cache=compile_cache, cuda_graphs=cuda_graphs)


def build_demo(pipe, queue_size: int = QUEUE_SIZE, thread: GenerationThread | None = None) -> gr.Blocks:
    """The page: controls on the left, the video and its parameters on the right; generations run on
    `thread` (a new GenerationThread by default)."""
    thread = thread or GenerationThread()

    def generate(prompt, negative_prompt, seed, steps, guidance_scale, frames, sampler, init_video, strength,
                 init_image, progress=gr.Progress()):  # noqa: B008  (Gradio's way of asking for a progress bar)
        """The video and its parameters. The mp4 the pipeline writes into the temp folder is this caller's to
        delete (README, Guarantees): yielded, Gradio copies it into its own cache (which delete_cache below
        ages out) before it resumes this generator, which then removes the original."""
        def report(step, timestep, latents):
            progress((step + 1, steps), desc='denoising')

        start = {'init_video': init_video, 'strength': strength} if init_video else {'init_image': init_image}
        try:
            out = thread.run(pipe, {'text': prompt}, negative_prompt=negative_prompt, seed=seed,
                             num_inference_steps=steps, guidance_scale=guidance_scale, num_frames=frames,
                             sampler=sampler, callback=report, **start)
        except (ValueError, TypeError, NonFiniteError) as error:  # checks name the option and its range
            raise gr.Error(str(error)) from None
        parameters = {k: v for k, v in out['parameters'].items() if k != 'output_video'}
        try:
            yield out['output_video'], parameters
        finally:   # also when Gradio closes the generator unresumed (a cancelled or failed event)
            with contextlib.suppress(FileNotFoundError):
                os.remove(out['output_video'])

    # delete_cache: served copies of videos older than a day go, checked hourly
    with gr.Blocks(title='ModelScope text-to-video', delete_cache=(3600, 86400)) as demo:
        gr.Markdown('# ModelScope text-to-video\nDescribe a short clip in English; '
                    '16 frames of 256x256 at 8 fps by default.')
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label='Prompt', lines=2, placeholder=EXAMPLES[0], elem_id='prompt')
                negative_prompt = gr.Textbox(label='Negative prompt', placeholder='what to steer away from',
                                             elem_id='negative-prompt')
                random_seed = gr.Button('Random seed', size='sm', elem_id='random-seed', render=False)
                seed = gr.Number(new_seed, label='Seed', precision=0, minimum=0, buttons=[random_seed],
                                 elem_id='seed')
                steps = gr.Slider(1, 100, value=50, step=1, precision=0, label='Steps', elem_id='steps')
                guidance_scale = gr.Slider(0, 20, value=9.0, step=0.5, label='Guidance scale',
                                           elem_id='guidance')
                frames = gr.Slider(1, 64, value=pipe.model.engine.config.max_frames, step=1, precision=0,
                                   label='Frames', elem_id='frames')
                sampler = gr.Dropdown(sorted(SAMPLERS), value=pipe.model.engine.config.sampler, label='Sampler',
                                      elem_id='sampler')
                with gr.Accordion('Start from a video or an image (optional)', open=False):
                    init_video = gr.Video(label='Video to re-render (video-to-video)', sources=['upload'],
                                          elem_id='init-video')
                    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, elem_id='strength',
                                         label='Strength: the share of the steps run on the video')
                    init_image = gr.Image(label='First frame (image-to-video)', type='numpy', image_mode='RGB',
                                          sources=['upload'], elem_id='init-image')
                run = gr.Button('Generate', variant='primary', elem_id='generate')
            with gr.Column():
                video = gr.Video(label='Video', autoplay=True, loop=True, interactive=False, elem_id='video')
                parameters = gr.JSON(label='Parameters used', elem_id='parameters')
        gr.Examples([[text] for text in EXAMPLES], inputs=[prompt], label='Example prompts')

        random_seed.click(new_seed, outputs=seed, queue=False)
        run.click(generate, inputs=[prompt, negative_prompt, seed, steps, guidance_scale, frames, sampler,
                                    init_video, strength, init_image],
                  outputs=[video, parameters], api_name='generate')
    # one generation at a time: the model holds the GPU
    return demo.queue(max_size=queue_size, default_concurrency_limit=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='ModelScope text-to-video Gradio demo.')
    parser.add_argument('--model', default=os.environ.get('MODELSCOPE_T2V_MODEL', DEFAULT_MODEL),
                        help='local model dir or hub id (default: $MODELSCOPE_T2V_MODEL, else %(default)s)')
    parser.add_argument('--hub', choices=HUBS, default='huggingface', help='hub of a hub id (default: %(default)s)')
    parser.add_argument('--base-model', default=None,
                        help='folder or hub id of the original model, for what a partial original-format model lacks')
    parser.add_argument('--device', default='gpu', help="'gpu' (CUDA when available, else CPU), 'cpu', 'cuda:1'")
    parser.add_argument('--host', default=None, help='address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)')
    parser.add_argument('--port', type=int, default=None, help='(default: $GRADIO_SERVER_PORT or 7860)')
    parser.add_argument('--queue-size', type=int, default=QUEUE_SIZE, help='waiting requests (default: %(default)s)')
    parser.add_argument('--compile', action='store_true',
                        help=COMPILE_HELP + '; the demo compiles on a default video before serving, and '
                        'serves requests of other shapes eager')
    parser.add_argument('--compile-mode', choices=COMPILE_MODES, default=FAST_COMPILE_MODE,
                        help="--compile's torch.compile mode (default: %(default)s)")
    parser.add_argument('--compile-cache', action='store_true',
                        help='--compile, keeping the compiled networks on disk: a restart loads them instead of '
                             'compiling again (TextToVideo.from_pretrained compile_cache=True)')
    parser.add_argument('--cuda-graphs', action=argparse.BooleanOptionalAction, default=None,
                        help='replay the uncompiled networks from CUDA graphs of their own kernels, captured on the '
                             'first request of each shape (a second or so): the default without --compile '
                             '(--no-cuda-graphs: launch each kernel from Python)')
    args = parser.parse_args(argv)
    args.compile = args.compile or args.compile_cache
    if args.compile and args.cuda_graphs:
        parser.error('--cuda-graphs replays the uncompiled networks: it cannot go with --compile or --compile-cache')
    args.cuda_graphs = replays_graphs(args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    pipe = load_pipeline(args.model, args.hub, args.device, args.base_model, compile_mode(args), args.compile_cache,
                         args.cuda_graphs)
    thread = GenerationThread()
    if args.compile and pipe.model.engine.device.type == 'cuda':   # on the CPU nothing compiles
        warm_up(pipe, thread)
    elif args.cuda_graphs and pipe.model.engine.device.type == 'cuda':
        print('demo: replaying the networks from CUDA graphs, captured on the first request of each shape',
              file=sys.stderr, flush=True)
    build_demo(pipe, args.queue_size, thread).launch(server_name=args.host, server_port=args.port)


if __name__ == '__main__':
    main()
