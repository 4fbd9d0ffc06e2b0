"""Command line: `modelscope-t2v "A panda eating bamboo on a rock." -o panda.mp4`.

Parses flags into the pipeline's options and calls the ModelScope pipeline;
holds no generation logic. Exit status 0 on success, 2 with a one-line reason
on a user error, 1 on any other failure, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from .hub import DEFAULT_MODEL, HUBS
from .request import MAX_FRAMES, MAX_SIDE
from .schedulers import DEFAULT_SAMPLER, SAMPLERS
from .text_to_video import COMPILE_MODES, FAST_COMPILE_MODE

COMPILE_HELP = ('torch.compile the networks on CUDA: about 3 min on the first video of a process, 43 s when an '
                'earlier process left its compiler caches; then a default video takes 1.3 s on an H200 against '
                '2.4 s uncompiled under CUDA graphs (docs/benchmarks.md). Ignored on the CPU')


def apply_compile_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--compile-cache compiles (it keeps what compiling makes); with --no-compile it has nothing to keep.
    --cuda-graphs replays the uncompiled networks: it rules compiling out, and goes with neither."""
    if args.compile_cache:
        if args.compile is False:
            parser.error('--compile-cache keeps compiled networks: it cannot go with --no-compile')
        args.compile = True
    if args.cuda_graphs:
        if args.compile:
            parser.error('--cuda-graphs replays the uncompiled networks: it cannot go with --compile or '
                         '--compile-cache (--compile-mode reduce-overhead gives compiled networks CUDA graphs)')
        args.compile = False


def replays_graphs(args: argparse.Namespace) -> bool:
    """--cuda-graphs / --no-cuda-graphs as given; without either, whenever the networks are not compiled."""
    return args.cuda_graphs if args.cuda_graphs is not None else not args.compile


def compile_mode(args: argparse.Namespace):
    """The torch.compile mode that --compile and --compile-mode ask for, or False."""
    return args.compile_mode if args.compile else False

EXAMPLE = 'modelscope-t2v "A panda eating bamboo on a rock." -o panda.mp4 --seed 42'


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Where the model comes from and where it runs."""
    group = parser.add_argument_group('model')
    group.add_argument('--model', default=DEFAULT_MODEL,
                       help='local model dir or hub id (default: %(default)s, downloaded once into the cache)')
    group.add_argument('--hub', choices=HUBS, default='huggingface', help='hub of a hub id (default: %(default)s)')
    group.add_argument('--base-model', default=None,
                       help='folder or hub id of the original model, for the files a partial original-format '
                            "--model lacks (zeroscope's zs2_576w/ has no autoencoder or configuration.json)")
    group.add_argument('--device', default='gpu',
                       help="'gpu' (CUDA when available, else CPU), 'cpu', 'cuda:1'... (default: %(default)s)")
    group.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                       help=COMPILE_HELP + '. Without --compile or --no-compile, one video is made uncompiled (it '
                       'would not pay back) and a batch job compiles, through the compile cache, when it has about '
                       '34 videos of one shape to make')
    group.add_argument('--compile-mode', choices=COMPILE_MODES, default=FAST_COMPILE_MODE,
                       help="--compile's torch.compile mode (default: %(default)s)")
    group.add_argument('--compile-cache', action='store_true',
                       help='--compile, keeping the compiled networks on disk in the compiler cache folder '
                            '($TORCHINDUCTOR_CACHE_DIR, default in the system temp folder), so that later runs on '
                            'this machine load them instead of compiling again (inductor\'s standalone_compile '
                            'artefacts of each block, built in parallel: on an H100 35.2-61.6 s of start-up once, then '
                            '8.3-13.4 s; a new video size compiles once more)')
    group.add_argument('--cuda-graphs', action=argparse.BooleanOptionalAction, default=None,
                       help='replay the uncompiled networks from CUDA graphs of their own kernels, captured on the '
                            'first video of each size (a second or so): the default whenever they are not compiled '
                            '(--no-cuda-graphs: launch each kernel from Python). Not with --compile. Ignored on '
                            'the CPU')
    group.add_argument('--low-memory', action='store_true',
                       help='keep the text encoder and autoencoder on the CPU between uses; decode frame by frame')
    group.add_argument('--half-cache', action='store_true',
                       help='load a half-precision safetensors copy of the weights (written on first use; '
                            'folder: $MODELSCOPE_T2V_CACHE or ~/.cache/modelscope_t2v)')


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """Every generation control, with the original's defaults."""
    group = parser.add_argument_group('generation')
    group.add_argument('--negative-prompt', default=None, help="what to steer away from (default: '')")
    group.add_argument('--seed', type=int, default=None, help='0..2**63-1; video i of a batch uses seed+i '
                       '(default: random, reported)')
    group.add_argument('--num-videos', dest='num_videos_per_prompt', type=int, default=None,
                       help='videos per prompt (default: 1)')
    group.add_argument('--num-frames', type=int, default=None,
                       help=f'1..{MAX_FRAMES} (default: max_frames of configuration.json, 16)')
    group.add_argument('--height', type=int, default=None, help=f'multiple of 8, up to {MAX_SIDE} (default: 256)')
    group.add_argument('--width', type=int, default=None, help=f'multiple of 8, up to {MAX_SIDE} (default: 256)')
    group.add_argument('--fps', type=float, default=None, help='frames per second of the file, 0.01..240 (default: 8)')
    group.add_argument('--steps', dest='num_inference_steps', type=int, default=None,
                       help='denoising steps, 1..1000 (default: 50; 4 with --sampler lcm, which takes 1..50)')
    group.add_argument('--guidance-scale', type=float, default=None,
                       help='classifier-free guidance, 0..100; <= 1 turns it off (default: 9.0)')
    group.add_argument('--eta', type=float, default=None, help='DDIM noise, 0..1 (default: 0)')
    group.add_argument('--sampler', choices=sorted(SAMPLERS), default=None,
                       help=f'(default: {DEFAULT_SAMPLER}, which reproduces the original exactly; lcm: few-step '
                            'UNets such as MCM or T2V-Turbo LoRAs, without classifier-free guidance)')
    group.add_argument('--decode-chunk-frames', type=int, default=None,
                       help='frames the autoencoder decodes at once (default: 4 on GPU, all on CPU)')
    group.add_argument('--no-progress', dest='show_progress', action='store_false', default=None,
                       help='no progress bar')
    loras = parser.add_argument_group('LoRAs')
    loras.add_argument('--lora', action='append', default=None, metavar='PATH',
                       help='a LoRA file, folder or hub id (owner/name[/subfolder]): stable_lora .safetensors, '
                            'cloneofsimo .pt, PEFT/diffusers; repeat for several')
    loras.add_argument('--lora-scale', action='append', type=float, default=None, metavar='SCALE',
                       help='-10..10: once for every LoRA, or once per --lora in order (default: 1)')
    start = parser.add_argument_group('starting frames and long videos')
    start.add_argument('--init-video', default=None,
                       help='video-to-video: a video file to re-render (resized to the output size; its frame count '
                            'unless --num-frames trims or loops it)')
    start.add_argument('--strength', type=float, default=None,
                       help='with --init-video (or --upscale-with): share of the steps run, (0, 1] (default: 0.6)')
    start.add_argument('--init-image', default=None, help='image-to-video: an image held as the first frame')
    start.add_argument('--temporal-window', type=int, default=None,
                       help='frames each temporal attention sees in a long video (default: the model\'s, 16)')
    start.add_argument('--temporal-stride', type=int, default=None,
                       help='frames between windows (default: a quarter of the window)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='modelscope-t2v', description='Text to video with ModelScope\'s 1.7B diffusion model.',
        epilog=f'example: {EXAMPLE}\nbatch jobs: modelscope-t2v batch --help\n'
               'other layouts: modelscope-t2v convert --help\n'
               'fine-tuning: modelscope-t2v train --help',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('prompt', help='what the video shows, in English')
    parser.add_argument('-o', '--output', dest='output_video', default=None,
                        help='.mp4 (H.264), .webm (VP9) or .gif; a batch writes NAME-0.mp4, NAME-1.mp4, ... '
                             '(default: a new file in the temp folder)')
    add_model_flags(parser)
    parser.add_argument('--upscale-with', default=None,
                        help='a second model (folder or hub id) that re-renders the video at its own size, after '
                             'the first leaves the GPU (zeroscope: --model cerspense/zeroscope_v2_576w '
                             '--upscale-with cerspense/zeroscope_v2_XL --strength 0.65)')
    add_generation_flags(parser)
    parser.add_argument('--verbose', action='store_true', help='log progress details')
    return parser


def generation_options(args: argparse.Namespace) -> dict:
    """The flags that map one to one onto the pipeline's options; unset ones are left out."""
    keys = ('negative_prompt', 'seed', 'num_videos_per_prompt', 'num_frames', 'height', 'width', 'fps',
            'num_inference_steps', 'guidance_scale', 'eta', 'sampler', 'decode_chunk_frames',
            'show_progress', 'output_video', 'init_video', 'strength', 'init_image', 'temporal_window',
            'temporal_stride', 'lora', 'lora_scale')
    options = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if len(options.get('lora_scale', ())) == 1:   # one --lora-scale: every LoRA's
        options['lora_scale'] = options['lora_scale'][0]
    return options


def resolve_models(args: argparse.Namespace) -> tuple:
    """(model dir, base model dir or None) of the --model, --base-model and --hub flags, downloaded where they
    are hub ids; a diffusers repo's fp16 files where --device is CUDA."""
    from .hub import resolve_model_dir
    from .pipeline import torch_device
    half = torch_device(args.device).type == 'cuda'
    base_model = resolve_model_dir(args.base_model, args.hub) if args.base_model else None
    return resolve_model_dir(args.model, args.hub, half), base_model


def load_pipeline(args: argparse.Namespace):
    """The ModelScope pipeline over the resolved model dir (the plugin registers on import)."""
    from modelscope.pipelines import pipeline

    from .pipeline import torch_device
    stop_if_interrupted()
    model_dir, base_model = resolve_models(args)
    if args.compile and torch_device(args.device).type == 'cuda':
        once = ('once on this machine for each video size (--compile-cache)' if args.compile_cache
                else 'once per process')
        print(f'modelscope-t2v: compiling the networks ({args.compile_mode}): the first video takes minutes, {once}',
              file=sys.stderr)
    if replays_graphs(args) and torch_device(args.device).type == 'cuda':
        print('modelscope-t2v: replaying the networks from CUDA graphs, captured on the first video of each size',
              file=sys.stderr)
    options = {'compile_unet': compile_mode(args), 'compile_cache': args.compile_cache,
               'cuda_graphs': replays_graphs(args), 'low_memory': args.low_memory, 'half_cache': args.half_cache,
               'base_model': base_model}
    pipe = pipeline('text-to-video-synthesis', model_dir, device=args.device, **options)
    stop_if_interrupted()   # ModelScope's building imports modules too
    return pipe


def quiet_modelscope() -> None:
    """Only errors from ModelScope's logger: its start-up chatter (models initiated, no preprocessor field) is not
    for a command's user. A filter, not a level: each of ModelScope's get_logger() calls sets the level again."""
    logging.getLogger('modelscope').addFilter(errors_only)   # added once however often called


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def run_generate(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_compile_flags(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(message)s')
    if not args.verbose:
        quiet_modelscope()
    from .config import FULL
    from .pipeline import torch_device
    from .request import parse_request
    torch_device(args.device)   # fail fast on a bad name, before loading
    options = generation_options(args)
    strength = options.pop('strength', None) if args.upscale_with else None   # the second pass's
    request = parse_request({'text': args.prompt}, FULL, **options)  # fail fast, before loading
    options['seed'] = request.seed   # the one given, or a new random one (reported)
    if args.upscale_with:
        paths, parameters = run_upscale(args, options, strength)
    else:
        out = load_pipeline(args)({'text': args.prompt}, **options)
        paths = out['output_video'] if isinstance(out['output_video'], list) else [out['output_video']]
        parameters = out['parameters']
    for path in paths:
        print(path)
    if args.verbose:
        print(json.dumps(parameters, indent=2), file=sys.stderr)
    return 0


def run_upscale(args: argparse.Namespace, options: dict, strength) -> tuple:
    """(paths, parameters) of --model's videos re-rendered by --upscale-with (upscale.py)."""
    from .hub import resolve_model_dir
    from .pipeline import torch_device
    from .upscale import DEFAULT_STRENGTH, generate_and_upscale
    model_dir, base_model = resolve_models(args)
    device = torch_device(args.device)
    upscale_dir = resolve_model_dir(args.upscale_with, args.hub, device.type == 'cuda')
    load = {'device': device, 'compile': compile_mode(args), 'compile_cache': args.compile_cache,
            'cuda_graphs': replays_graphs(args), 'low_memory': args.low_memory, 'half_cache': args.half_cache,
            'base_model': base_model}
    result = generate_and_upscale(args.prompt, model_dir, upscale_dir, strength or DEFAULT_STRENGTH, load, **options)
    return result.paths, result.parameters


def build_convert_parser() -> argparse.ArgumentParser:
    from .convert import DTYPES, LAYOUTS
    parser = argparse.ArgumentParser(
        prog='modelscope-t2v convert', description='Write a model folder in the other layout (exact tensors).',
        epilog='example: modelscope-t2v convert cerspense/zeroscope_v2_576w ./zeroscope-original --to original')
    parser.add_argument('src', help='model folder or hub id, in either layout')
    parser.add_argument('dst', help='the new folder (must not exist)')
    parser.add_argument('--to', required=True, choices=LAYOUTS, help='layout to write')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default=None, help='cast the weights (default: keep)')
    parser.add_argument('--safetensors', action='store_true', help='write .safetensors (default: torch pickles)')
    parser.add_argument('--hub', choices=HUBS, default='huggingface', help='hub of a hub id (default: %(default)s)')
    parser.add_argument('--base-model', default=None, help='folder or hub id supplying the files a partial '
                        'original-format src lacks')
    return parser


def run_convert(argv) -> int:
    from .convert import convert
    from .hub import resolve_model_dir
    args = build_convert_parser().parse_args(argv)
    base_model = resolve_model_dir(args.base_model, args.hub) if args.base_model else None
    print(convert(resolve_model_dir(args.src, args.hub), args.dst, args.to, args.dtype, args.safetensors,
                  base_model))
    return 0


def run_train(argv) -> int:
    from .training.run import main as train_main   # Lightning and peft load only for this command
    return train_main(argv)


def run_batch(argv) -> int:
    from .batch import run_batch   # imported here: it imports this module
    return run_batch(argv)


def main(argv=None) -> int:
    """The command line; everything it does runs under guarded (the package's imports before it handle a
    Ctrl-C themselves: __init__.py)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {'batch': run_batch, 'convert': run_convert, 'train': run_train}
    if argv and argv[0] in commands:
        return guarded(commands[argv[0]], argv[1:])
    return guarded(run_generate, argv)


def guarded(command, argv) -> int:
    """Run a command, turning errors into one line on stderr and an exit status."""
    from .hub import ModelNotFound
    from .weights import CheckpointError
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, remember_interrupt) if main_thread else None
    try:
        return command(argv)
    except KeyboardInterrupt:
        return report_interrupt()
    except (ValueError, TypeError, ModelNotFound, CheckpointError) as error:
        if _interrupts:
            return report_interrupt()
        print(f'modelscope-t2v: error: {error}', file=sys.stderr)
        return 2
    except Exception as error:  # anything else: still one line, the details in --verbose logs
        if _interrupts:
            return report_interrupt()
        logging.getLogger(__name__).debug('failure', exc_info=True)
        print(f'modelscope-t2v: failed: {type(error).__name__}: {error}', file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


_interrupts = []   # SIGINTs received under guarded


def remember_interrupt(signum, frame) -> None:
    """Ctrl-C as Python's own handler takes it (KeyboardInterrupt), remembered: an import can turn it into
    another error (transformers' lazy modules: ModuleNotFoundError) or catch it, and the command still ends as
    interrupted (stop_if_interrupted)."""
    _interrupts.append(signum)
    raise KeyboardInterrupt


def stop_if_interrupted() -> None:
    """After imports that may have caught a Ctrl-C: stop as it asked."""
    if _interrupts:
        raise KeyboardInterrupt


def report_interrupt() -> int:
    print('modelscope-t2v: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
    sys.exit(main())
