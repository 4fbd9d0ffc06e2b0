"""Batch jobs: `modelscope-t2v batch prompts.jsonl --out DIR`, one video per JSON line, resumable.

Every line is checked with parse_request before any generation; a bad line is
reported on stderr with its number and skipped. Each finished video gets one
line in DIR/manifest.jsonl: {"line", "output", "seconds", "parameters" (seed
included), "request", "rank", "finished_at"}. A rerun skips an item only when
its manifest entry exists AND its file decodes to the entry's frame count and
size (video_io.probe_video); anything else is made again. Lines whose options differ only in
their text, negative prompt, seed and output share each generation, --videos-per-call at a time
(batch_calls.py), each video from its own line's seed.

Several GPUs or nodes: `torchrun --nproc-per-node N -m modelscope_t2v.batch ...`.
Rank r takes the lines of index i (0-based) with i % world_size == r, runs on
cuda:LOCAL_RANK (the CPU without CUDA), appends to DIR/manifest.rank{r}.jsonl,
and rank 0 folds those into manifest.jsonl at the end. Exit status 0 when every
line has its video, 3 when some line failed, 2 on a bad flag, 1 otherwise
(torchrun itself exits 1 when a rank does not exit 0). Several nodes need --out
on a filesystem they share: rank 0 reads every rank's manifest file.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import scratch, video_io
from .batch_calls import MAX_VIDEOS_PER_CALL, Call, make_call, plan_calls
from .cli import (add_generation_flags, add_model_flags, apply_compile_flags, generation_options, guarded,
                  load_pipeline, quiet_modelscope, resolve_models)
from .model_folder import open_folder
from .request import GenerationRequest, parse_request
from .text_to_video import write_generated_video
from .video_io import probe_video

logger = logging.getLogger(__name__)

EXIT_SOME_FAILED = 3
MANIFEST = 'manifest.jsonl'
RANK_MANIFEST = 'manifest.rank{}.jsonl'
# A rank that is done waits at the final barrier for the slowest one: hours on a long
# or unevenly resumed job, far beyond torch.distributed's 30-minute default.
BARRIER_TIMEOUT = datetime.timedelta(days=7)
# Request keys a line may not set: the batch names the files and always writes video.
NOT_IN_A_LINE = {'output_video': "name the file with 'output' (a path inside --out)",
                 'output_type': 'a batch always writes video files',
                 'callback': 'not available from JSON', 'generator': "use 'seed'",
                 'latents': "use 'seed'"}
EXAMPLE = ('prompts.jsonl:  {"text": "A panda eating bamboo on a rock.", "seed": 42}\n'
           '                {"text": "A red kite over the sea.", "num_frames": 24, "output": "kite.mp4"}\n'
           'one GPU:        modelscope-t2v batch prompts.jsonl --out videos\n'
           'N GPUs:         torchrun --nproc-per-node N -m modelscope_t2v.batch prompts.jsonl --out videos')


# Compiling through the compile cache pays back from about this many videos of one shape: on H100s its cold
# start-up was 35.2-61.6 s against 10.6 s for the uncompiled networks under CUDA graphs, and it then saves
# 1.13 s a default video (1.36 s against 2.49 s; docs/benchmarks.md, start-up): 22-45 videos; each shape compiles
# anew, once a machine (a later job loads it: 8.3-13.4 s of start-up).
COMPILE_PAYS_BACK_AFTER = 34
# videos a generation on CUDA: 44.2 a minute after the first generation against 42.0 at one (H100, 64 default
# videos; four: 46.1, but a longer start and whole job; docs/benchmarks.md)
CUDA_VIDEOS_PER_CALL = 2


@dataclass
class Item:
    line: int                    # 1-based line number in the prompts file
    output: str                  # file path relative to --out
    values: dict                 # flags' defaults + the line's keys, as given (what a rerun compares)
    request: GenerationRequest   # the checked request (its seed drawn when none was given)


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False    # torch.distributed initialised (run under torchrun)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, counts: List[int]) -> List[int]:
        """Element-wise sum of the counts over all ranks."""
        if not self.distributed:
            return counts
        total = torch.tensor(counts, dtype=torch.int64)
        torch.distributed.all_reduce(total)
        return total.tolist()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='modelscope-t2v batch', description='One video per line of a JSON Lines file; '
        'reruns skip finished lines. The flags below are defaults that a line\'s keys override.',
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('prompts', help='JSON Lines: one object per line with "text" and any generation '
                        'option (seed, num_frames, sampler, ...); "output" names the file (default NNNNN.mp4)')
    parser.add_argument('--out', required=True, help='folder of the videos and manifest.jsonl (created)')
    parser.add_argument('--overwrite', action='store_true', help='make every line again, finished or not')
    add_model_flags(parser)
    add_generation_flags(parser)
    parser.add_argument('--videos-per-call', type=videos_per_call_flag, metavar='N',
                        help='lines whose options differ only in text, negative prompt, seed and output are made '
                        f'N to a generation, one video per row of the UNet\'s batch (1-{MAX_VIDEOS_PER_CALL}; '
                        'default 2 on CUDA, 1 on the CPU); each line\'s video comes from its own seed all the same')
    parser.add_argument('--verbose', action='store_true', help='log progress details')
    return parser


def videos_per_call_flag(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if not 1 <= value <= MAX_VIDEOS_PER_CALL:
        raise argparse.ArgumentTypeError(f'{value} is outside 1-{MAX_VIDEOS_PER_CALL}')
    return value


# --- the prompts file -------------------------------------------------------------

def read_items(path: str, out_dir: str, config, defaults: dict) -> Tuple[List[Item], List[Tuple[int, str]]]:
    """The checked items of a prompts file and the (line, reason) of each bad line."""
    if not os.path.isfile(path):
        raise ValueError(f'prompts file {path!r} does not exist')
    items, bad, owners = [], [], {}
    with open(path, encoding='utf-8') as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue  # blank lines separate groups of prompts
            try:
                item = parse_line(number, text, out_dir, config, defaults)
                key = os.path.normcase(os.path.normpath(item.output))
                if key in owners:
                    raise ValueError(f'output {item.output!r} is also the file of line {owners[key]}')
                owners[key] = number
                items.append(item)
            except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
                bad.append((number, str(error)))
    return items, bad


def parse_line(number: int, text: str, out_dir: str, config, defaults: dict) -> Item:
    """One line -> a checked Item; ValueError/TypeError say what is wrong. Nothing is written."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f'invalid JSON ({error})') from None
    if not isinstance(line, dict):
        raise TypeError(f'expected a JSON object like {{"text": "..."}}, got {type(line).__name__}')
    for key, reason in NOT_IN_A_LINE.items():
        if key in line:
            raise ValueError(f'{key!r} cannot be set in a batch line: {reason}')
    values = {**defaults, **line}  # the line's keys win over the flags
    output = _output_name(values.pop('output', None), number, out_dir)
    request = parse_request(values, config)   # the output was checked above: its folders may not exist yet
    if request.num_videos != 1:
        raise ValueError(f'this line asks for {request.num_videos} videos; a batch makes one video per line '
                         '(text must be one string and num_videos_per_prompt 1): repeat the line instead')
    values.pop('show_progress', None)  # no effect on the video
    return Item(line=number, output=output, values={**values, 'output': output}, request=request)


def _output_name(name, number: int, out_dir: str) -> str:
    """The file of a line relative to out_dir: its 'output', checked as a video file inside out_dir (whose
    missing folders are made when its video is), or NNNNN.mp4."""
    if name is None:
        return f'{number:05d}.mp4'
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"output must be a file name like 'kite.mp4', not {name!r}")
    video_io.validate_output_name(name)   # NUL characters, extension
    relative = os.path.normpath(name)
    if os.path.isabs(relative) or relative.split(os.sep)[0] == os.pardir:
        raise ValueError(f'output {name!r} must be a path inside --out {out_dir!r}')
    real_out = os.path.realpath(out_dir)
    real_folder = os.path.realpath(os.path.join(out_dir, os.path.dirname(relative)))
    if os.path.commonpath([real_out, real_folder]) != real_out:
        raise ValueError(f'output {name!r} would be written in {real_folder!r}, outside --out {out_dir!r}, '
                         'through a symbolic link')
    _check_writable_path(os.path.join(out_dir, relative), name)
    return relative


def _check_writable_path(path: str, name: str) -> None:
    """What video_io.validate_output_path checks, where the folders of `path` may not exist yet: each
    missing one is checked for its name's length, the deepest existing one for writability."""
    folder, missing = os.path.dirname(path), []
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise ValueError(f'output {name!r}: {folder!r} is a file, not a folder')
        folder, part = os.path.split(folder)
        missing.insert(0, part)
    if not missing:
        video_io.validate_output_path(path)
        return
    for part in missing:
        video_io.check_name_length(part, folder)
    video_io.check_name_length(os.path.basename(path), folder, video_io.PARTIAL_EXTRA_BYTES)
    try:
        video_io.check_writable(folder)
    except ValueError as error:
        raise ValueError(f'output {name!r}: {error}') from None


# --- the manifest ----------------------------------------------------------------

def append_entry(path: str, entry: dict) -> None:
    """Append one complete JSON line and fsync: a crash leaves at most a truncated last line."""
    with open(path, 'ab') as f:
        if f.tell() and not _ends_with_newline(path):
            f.write(b'\n')  # end a fragment left by a crash, so this entry stays whole
        f.write(json.dumps(entry).encode() + b'\n')
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: str) -> bool:
    with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b'\n'


def read_entries(path: str) -> List[dict]:
    """The complete entries of a manifest file; truncated or foreign lines are skipped with a warning."""
    if not os.path.isfile(path):
        return []
    entries = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get('line'), int):
                logger.warning('%s:%d is not a complete entry (a run stopped while writing it?); ignored',
                               path, number)
                continue
            entries.append(entry)
    return entries


def merge_manifests(out_dir: str, remove_rank_files: bool) -> Dict[int, dict]:
    """Fold manifest.jsonl and every manifest.rank*.jsonl into manifest.jsonl: newest entry per line, sorted."""
    rank_files = sorted(glob.glob(os.path.join(out_dir, RANK_MANIFEST.format('*'))))
    latest: Dict[int, dict] = {}
    for path in [os.path.join(out_dir, MANIFEST)] + rank_files:
        for entry in read_entries(path):
            old = latest.get(entry['line'])
            if old is None or entry.get('finished_at', 0) >= old.get('finished_at', 0):
                latest[entry['line']] = entry
    text = ''.join(json.dumps(latest[n]) + '\n' for n in sorted(latest))
    _write_atomically(os.path.join(out_dir, MANIFEST), text)
    if remove_rank_files:
        for path in rank_files:
            os.remove(path)
    return latest


def _write_atomically(path: str, text: str) -> None:
    """Write a temporary file beside path, then rename it into place; those of runs killed before go first."""
    scratch.remove_stale(os.path.dirname(path), re.compile(re.escape(os.path.basename(path)) + r'\.partial-\d+'))
    tmp = f'{path}.partial-{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        scratch.remove_quietly(tmp)
        raise


def is_finished(item: Item, entry: Optional[dict], out_dir: str) -> bool:
    """Whether the manifest says the item is done and its file decodes to the recorded frames and size."""
    if entry is None or entry.get('output') != item.output:
        return False
    path = os.path.join(out_dir, item.output)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        logger.warning('line %d: %s is missing; making it again', item.line, path)
        return False
    params = entry.get('parameters', {})
    try:
        info = probe_video(path)
    except ValueError as error:
        logger.warning('line %d: %s is unreadable (%s); making it again', item.line, path, error)
        return False
    found = (info['frames'], info['height'], info['width'])
    expected = (params.get('num_frames'), params.get('height'), params.get('width'))
    if found != expected:
        logger.warning('line %d: %s has frames, height, width %s, not %s; making it again',
                       item.line, path, found, expected)
        return False
    if entry.get('request') != item.values:
        logger.warning('line %d: %s was made with other settings than the line and flags give now; kept '
                       '(--overwrite makes it again)', item.line, path)
    return True


# --- ranks and generation ------------------------------------------------------------

def init_ranks() -> Ranks:
    """Join torchrun's process group when WORLD_SIZE is set (RANK, LOCAL_RANK, MASTER_* from it)."""
    if 'WORLD_SIZE' not in os.environ:
        return Ranks()
    # gloo for every device: the ranks only exchange a barrier and three counts, on the CPU
    torch.distributed.init_process_group('gloo', timeout=BARRIER_TIMEOUT)
    return Ranks(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                 local_rank=int(os.environ.get('LOCAL_RANK', 0)), distributed=True)


def rank_device(device: str, ranks: Ranks) -> str:
    """Under torchrun 'gpu'/'cuda' means this rank's GPU, cuda:LOCAL_RANK (the CPU without CUDA)."""
    if not ranks.distributed or device not in ('gpu', 'cuda'):
        return device
    if not torch.cuda.is_available():
        return 'cpu'
    torch.cuda.set_device(ranks.local_rank)
    return f'cuda:{ranks.local_rank}'


def resolve_model(args, ranks: Ranks) -> tuple:
    """(model dir, base model dir or None), local; each node's local rank 0 downloads first, the others
    then read its cache."""
    if ranks.local_rank == 0:
        dirs = resolve_models(args)
    ranks.barrier()
    if ranks.local_rank != 0:
        dirs = resolve_models(args)
    return dirs


def write_item(frames, entry: dict, out_dir: str) -> dict:
    """Encode one item's video as the pipeline would (its parameters in the file's comment); the entry, timed."""
    start = time.perf_counter()
    path = os.path.join(out_dir, entry['output'])
    os.makedirs(os.path.dirname(path), exist_ok=True)   # the line's folders, if any
    write_generated_video(frames, path, entry['parameters'])
    seconds = entry['seconds'] + time.perf_counter() - start
    return {**entry, 'seconds': round(seconds, 3), 'finished_at': time.time()}


def run_items(args, items: List[Item], done: Dict[int, dict], ranks: Ranks, dirs: tuple) -> List[int]:
    """Make this rank's unfinished items; counts [made, skipped, failed]. A video's file is encoded on a
    background thread while the GPU makes the next one; at most one file is being written at a time."""
    mine = [item for item in items if (item.line - 1) % ranks.world_size == ranks.rank]
    todo = [item for item in mine if args.overwrite or not is_finished(item, done.get(item.line), args.out)]
    manifest = os.path.join(args.out, MANIFEST if not ranks.distributed else RANK_MANIFEST.format(ranks.rank))
    counts = {'made': 0, 'failed': 0}
    if not todo:  # the model is loaded once, and only when there is work
        return [0, len(mine), 0]
    decided = args.compile is None
    args.compile = compile_pays_back(args, todo)
    args.compile_cache = args.compile_cache or (decided and args.compile)   # its own choice keeps what it compiles
    pipe = load_pipeline(argparse.Namespace(**{**vars(args), 'model': dirs[0], 'base_model': dirs[1]}))

    def finish(item: Item, writing: Future) -> None:
        try:
            entry = writing.result()
        except Exception as error:  # e.g. a full disk: that line failed, the next may not
            return report_failure(item, error, counts)
        append_entry(manifest, entry)
        print(os.path.join(args.out, item.output), flush=True)
        counts['made'] += 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix='modelscope-t2v-writer') as writer:
        pending = []   # (item, its file being written) of the previous call
        apart = set()  # keys whose lines failed together: made one at a time from then on
        for call in plan_calls(todo, videos_per_call(args)):
            made = make_videos(pipe, call, ranks.rank, counts, apart)
            for item_and_writing in pending:
                finish(*item_and_writing)
            pending = [(item, writer.submit(write_item, frames, entry, args.out)) for item, frames, entry in made]
        for item_and_writing in pending:
            finish(*item_and_writing)
    return [counts['made'], len(mine) - len(todo), counts['failed']]


def make_videos(pipe, call: Call, rank: int, counts: dict, apart: set) -> list:
    """A call's (item, frames, entry) per item. Where lines made together fail (out of memory at that batch size,
    a NaN in one video), each is made again alone, and so are the later lines of their key (added to `apart`):
    a line's failure is its own."""
    if len(call.rows) > 1 and call.key in apart:
        return [made for alone in call.alone() for made in make_videos(pipe, alone, rank, counts, apart)]
    try:
        return make_call(pipe, call, rank)
    except Exception as error:  # e.g. out of memory at one size: report it, go on with the rest
        if len(call.rows) == 1:
            report_failure(call.items[0], error, counts)
            return []
        lines = ', '.join(str(item.line) for item in call.items)
        print(f'modelscope-t2v batch: lines {lines} made together failed ({type(error).__name__}: {error}); '
              'making them and the later lines of these options one at a time', file=sys.stderr)
        apart.add(call.key)
    return make_videos(pipe, call, rank, counts, apart)


def videos_per_call(args) -> int:
    """--videos-per-call, else CUDA_VIDEOS_PER_CALL on CUDA and 1 elsewhere."""
    from .pipeline import torch_device
    if args.videos_per_call is not None:
        return args.videos_per_call
    return CUDA_VIDEOS_PER_CALL if torch_device(args.device).type == 'cuda' else 1


def compile_pays_back(args, todo: List[Item]) -> bool:
    """--compile or --no-compile as given; without either, compile (through the compile cache: run_items) on CUDA
    when this rank has at least COMPILE_PAYS_BACK_AFTER videos for each shape (frames, height, width) among its
    lines. Says which on stderr."""
    from .pipeline import torch_device
    if args.compile is not None or torch_device(args.device).type != 'cuda':
        return bool(args.compile)
    shapes = {(i.request.num_frames, i.request.height, i.request.width) for i in todo}
    enough = len(todo) >= COMPILE_PAYS_BACK_AFTER * len(shapes)
    print(f'modelscope-t2v batch: {len(todo)} videos in {len(shapes)} shape(s): '
          + ('compiling pays back, compiling (kept in the compile cache for later jobs)' if enough else
             f'not compiling (it pays back from about {COMPILE_PAYS_BACK_AFTER} videos a shape; --compile forces it)'),
          file=sys.stderr)
    return enough


def report_failure(item: Item, error: Exception, counts: dict) -> None:
    logger.debug('line %d failed', item.line, exc_info=(type(error), error, error.__traceback__))
    print(f'modelscope-t2v batch: line {item.line}: failed: {type(error).__name__}: {error}', file=sys.stderr)
    counts['failed'] += 1


def run_batch(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_compile_flags(parser, args)
    ranks = init_ranks()
    try:
        return _run(args, ranks)
    finally:
        if ranks.distributed:
            torch.distributed.destroy_process_group()


def _run(args, ranks: Ranks) -> int:
    # 1. logging, device and flags (a bad flag is a user error for the whole batch: exit 2)
    prefix = f'[rank {ranks.rank}] ' if ranks.distributed else ''
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=prefix + '%(message)s')
    if not args.verbose:
        quiet_modelscope()
    args.device = rank_device(args.device, ranks)
    defaults = generation_options(args)
    if ranks.distributed and args.show_progress is None:
        defaults['show_progress'] = False  # N interleaved progress bars help no one
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f'--out {args.out!r} is a file, not a folder')
    os.makedirs(args.out, exist_ok=True)

    # 2. check every line before any generation; every rank reads the same verdicts
    dirs = resolve_model(args, ranks)
    config = open_folder(*dirs).config
    parse_request({'text': 'a check of the flags'}, config, **defaults)
    if defaults.get('num_videos_per_prompt', 1) != 1:
        raise ValueError(f"--num-videos {defaults['num_videos_per_prompt']}: a batch makes one video per line; "
                         'repeat a line with other seeds instead')
    items, bad = read_items(args.prompts, args.out, config, defaults)
    if ranks.rank == 0:
        for number, reason in bad:
            print(f'modelscope-t2v batch: line {number}: {reason}; skipped', file=sys.stderr)

    # 3. rank 0 folds earlier runs' manifests (and drops a truncated line) before anyone reads them
    if ranks.rank == 0:
        merge_manifests(args.out, remove_rank_files=True)
    ranks.barrier()
    done = {entry['line']: entry for entry in read_entries(os.path.join(args.out, MANIFEST))}

    # 4. this rank's share, then the merged manifest once every rank is done
    made, skipped, failed = ranks.sum(run_items(args, items, done, ranks, dirs))
    ranks.barrier()
    if ranks.rank == 0:
        merge_manifests(args.out, remove_rank_files=False)  # rank files stay: this run's record per rank
        print(f'modelscope-t2v batch: {made} made, {skipped} already finished, {len(bad) + failed} failed; '
              f'{os.path.join(args.out, MANIFEST)}', file=sys.stderr)
    ranks.barrier()  # torchrun stops the group when one rank exits non-zero: not before the merge
    return EXIT_SOME_FAILED if bad or failed else 0


def main(argv=None) -> int:
    return guarded(run_batch, sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
    sys.exit(main())
