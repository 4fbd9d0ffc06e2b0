"""Write, probe and read video files with imageio-ffmpeg's bundled ffmpeg; the only module that writes video."""
from __future__ import annotations

import contextlib
import logging
import numbers
import os
import pathlib
import re
import secrets
import shlex
import subprocess
import tempfile
from typing import IO, Any

import numpy as np

from . import scratch

logger = logging.getLogger(__name__)

# Supported output extensions: H.264 in MP4 (plays in browsers), Matroska and QuickTime; VP9 WebM;
# palette GIF looping forever.
CONTAINERS = ('.mp4', '.mkv', '.mov', '.webm', '.gif')
# ffmpeg's muxer of each H.264 container
H264_MUXERS = {'.mp4': 'mp4', '.mkv': 'matroska', '.mov': 'mov'}
# Tags kept by MP4 and MOV (iTunes/QuickTime atoms) and WebM and MKV (Matroska tags): MP4's muxer silently
# drops any other key, so others are refused. GIF has no tags: there they are dropped with a warning.
METADATA_KEYS = ('title', 'comment', 'description', 'artist', 'date', 'copyright')
# write_video's quality is a CRF (lower is better, larger files): default and valid range; ignored for GIF.
DEFAULT_QUALITY = {**dict.fromkeys(H264_MUXERS, 18), '.webm': 30}
QUALITY_RANGE = {**dict.fromkeys(H264_MUXERS, (0, 51)), '.webm': (0, 63)}
# Frame rates every container writes exactly: a GIF frame lasts at most 655.35 s, and below about 1e-5 fps
# MP4's muxer refuses the frame duration (ffmpeg parses no rate at all from 1e-300).
FPS_RANGE = (0.01, 240.0)
# write_video's temporary file beside the target: '.NAME.partial-XXXXXXXX.EXT', 18 bytes longer than NAME.EXT
PARTIAL_RE = re.compile(r'\..*\.partial-[0-9a-f]{8}\.(?:mp4|mkv|mov|webm|gif)', re.IGNORECASE | re.DOTALL)
PARTIAL_EXTRA_BYTES = len('..partial-') + 8
# Containers encoded as yuv420p, whose half-resolution chroma needs even width and height.
_EVEN_SIZE = (*H264_MUXERS, '.webm')
_STREAM_RE = re.compile(
    r'Stream #\d+:\d+.*?: Video: (?P<codec>\w+).*?, (?P<pix_fmt>\w+)(?:\([^)]*\))?, (?P<width>\d+)x(?P<height>\d+)(?P<rest>.*)'
)


def _ffmpeg() -> str:
    """The ffmpeg that imageio-ffmpeg bundles (imported here: only writing needs it)."""
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def validate_output_path(path: str | os.PathLike) -> pathlib.Path:
    """Check, before any model work, what can fail in writing path: its type, NUL characters, extension, name
    length (with the temporary name's), an existing and writable parent folder, no folder in its place."""
    target = validate_output_name(path)
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f'output path {str(path)!r}: folder {str(folder)!r} does not exist')
    check_name_length(target.name, folder, PARTIAL_EXTRA_BYTES)   # before is_dir(), which a long name fails
    if target.is_dir():
        raise ValueError(f'output path {str(path)!r} is a folder, not a file name')
    try:
        check_writable(folder)
    except ValueError as error:
        raise ValueError(f'output path {str(path)!r}: {error}') from None
    return target


def check_writable(folder: str | os.PathLike) -> None:
    """Raise ValueError unless a file can be created in `folder`. A file is made and removed at once (unnamed
    where the system can): the one sure test, as root passes os.access() on a read-only mode."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f'folder {str(folder)!r} is not writable ({error.strerror})') from None


def validate_output_name(path: str | os.PathLike) -> pathlib.Path:
    """The checks of validate_output_path that need no folder: type, NUL characters and extension."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'output path must be a str or os.PathLike, got {type(path).__name__}: {path!r}')
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f'output path must be a str or os.PathLike of a str, got {text!r}')
    if '\0' in text:
        raise ValueError(f'output path {text!r} holds a NUL character, which no file name may hold')
    target = pathlib.Path(text)
    if target.suffix.lower() not in CONTAINERS:
        raise ValueError(f'output path {text!r} has extension {target.suffix!r}; supported: {", ".join(CONTAINERS)}')
    return target


def check_name_length(name: str, folder: str | os.PathLike, extra_bytes: int = 0) -> None:
    """Raise ValueError when `name`, plus `extra_bytes` for a temporary name made of it, is longer than the
    file system of `folder` (an existing folder) takes (PC_NAME_MAX; 255 bytes on Linux's)."""
    try:
        limit = os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError):
        limit = 255   # the common limit, where the system does not say
    size = len(os.fsencode(name))
    if size + extra_bytes > limit:
        raise ValueError(f'file name {name[:40]!r}... is {size} bytes long; the file system of {str(folder)!r} '
                         f'takes names of up to {limit} bytes'
                         + (f', and the temporary name adds {extra_bytes}: at most {limit - extra_bytes}'
                            if extra_bytes else ''))


def temporary_video_path(suffix: str = '.mp4') -> str:
    """A fresh, not yet existing path in the system temp folder (ModelScope pipelines return a new mp4 there);
    the file written there belongs to whoever asked for it: the pipeline's caller (README, Guarantees)."""
    if suffix not in CONTAINERS:
        raise ValueError(f'suffix {suffix!r} is not supported; choose one of {", ".join(CONTAINERS)}')
    return os.path.join(tempfile.gettempdir(), f'modelscope_t2v-{secrets.token_hex(8)}{suffix}')


def write_video(
    frames: np.ndarray,
    path: str | os.PathLike,
    fps: float = 8,
    metadata: dict[str, str] | None = None,
    quality: int | None = None,
) -> str:
    """Encode uint8 frames (f, h, w, 3) into path atomically (temp file, then os.replace); return the path."""
    # 1. check every argument before anything touches the disk
    target = validate_output_path(path)
    ext = target.suffix.lower()
    frames = _check_frames(frames)
    fps = _check_fps(fps)
    args = _codec_args(ext, _check_quality(ext, quality)) + _metadata_args(ext, metadata)
    # 2. yuv420p needs even sizes: repeat the last column / row once, so 65x63 frames give a 66x64 video
    if ext in _EVEN_SIZE:
        frames = _pad_to_even(frames)
    # 3. encode into a visibly temporary file beside the target, then swap it in (replacing an existing
    #    file); first remove what writers killed before left in the folder (scratch.py)
    scratch.remove_stale(target.parent, PARTIAL_RE, once=True)
    tmp = target.with_name(f'.{target.stem}.partial-{secrets.token_hex(4)}{target.suffix}')
    f, h, w, _ = frames.shape
    cmd = [
        _ffmpeg(), '-hide_banner', '-loglevel', 'error',
        '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-video_size', f'{w}x{h}', '-framerate', str(fps), '-i', 'pipe:0',
        *args, '-n', f'file:{tmp}',
    ]  # fmt: skip
    try:
        _run_encoder(cmd, frames)
        os.replace(tmp, target)
    except BaseException:
        scratch.remove_quietly(tmp)   # never raises: the error to see is the one being handled
        raise
    logger.info('wrote %s: %d frames %dx%d at %g fps', target, f, w, h, fps)
    return os.fspath(target)


def _check_frames(frames: Any) -> np.ndarray:
    """Return frames if they are a uint8 array (f, h, w, 3) with at least one frame; raise otherwise."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f'frames must be a numpy array (f, h, w, 3) uint8, got {type(frames).__name__}')
    if frames.dtype != np.uint8:
        raise TypeError(f'frames must have dtype uint8, got {frames.dtype}; scale to 0..255 and cast first')
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f'frames must have shape (f, h, w, 3) with f, h, w >= 1, got {frames.shape}')
    return frames


def _check_fps(fps: Any) -> float:
    """Return fps as a float if it is a number in FPS_RANGE; raise otherwise."""
    low, high = FPS_RANGE
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise TypeError(f'fps must be a number in [{low}, {high}], got {type(fps).__name__}: {fps!r}')
    if not low <= fps <= high:   # False for NaN too
        raise ValueError(f'fps must be in [{low}, {high}], got {fps!r}')
    return float(fps)


def _check_quality(ext: str, quality: Any) -> int | None:
    """Return the CRF to use for ext (None for GIF); raise if quality is outside QUALITY_RANGE."""
    if ext not in QUALITY_RANGE:
        return None
    if quality is None:
        return DEFAULT_QUALITY[ext]
    low, high = QUALITY_RANGE[ext]
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral):
        raise TypeError(f'quality must be an integer CRF in [{low}, {high}] for {ext}, got {quality!r}')
    if not low <= quality <= high:
        raise ValueError(f'quality (CRF) must be in [{low}, {high}] for {ext}, got {quality}')
    return int(quality)


def _codec_args(ext: str, quality: int | None) -> list[str]:
    """ffmpeg output options choosing the encoder and muxer of one container."""
    if ext in H264_MUXERS:
        # faststart (MP4, MOV) moves the index in front of the data so players start while downloading
        faststart = ['-movflags', '+faststart'] if ext != '.mkv' else []
        return ['-c:v', 'libx264', '-pix_fmt', 'yuv420p', '-crf', str(quality), *faststart, '-f', H264_MUXERS[ext]]
    if ext == '.webm':
        # -b:v 0 makes the CRF a constant quality instead of a cap on a default bitrate
        return ['-c:v', 'libvpx-vp9', '-pix_fmt', 'yuv420p', '-crf', str(quality), '-b:v', '0', '-row-mt', '1', '-f', 'webm']
    # one 256-colour palette computed over all frames, then every frame mapped onto it; -loop 0 repeats forever
    return ['-vf', 'split[a][b];[a]palettegen[p];[b][p]paletteuse', '-loop', '0', '-f', 'gif']


def _metadata_args(ext: str, metadata: dict[str, str] | None) -> list[str]:
    """ffmpeg '-metadata key=value' options for the container tags; raise on keys or values it cannot keep."""
    if not metadata:
        return []
    for key, value in metadata.items():
        if key not in METADATA_KEYS:
            raise ValueError(f'metadata key {key!r} is not supported; choose from {", ".join(METADATA_KEYS)}')
        if not isinstance(value, str):
            raise TypeError(f'metadata[{key!r}] must be a str (e.g. JSON text), got {type(value).__name__}')
    if ext == '.gif':
        logger.warning('GIF files have no metadata tags; dropping %s', ', '.join(metadata))
        return []
    return [arg for key, value in metadata.items() for arg in ('-metadata', f'{key}={value}')]


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad (f, h, w, 3) frames to even h and w by repeating the last row / column."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    logger.info('padding %dx%d frames to %dx%d for yuv420p', w, h, w + w % 2, h + h % 2)
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode='edge')


def _feed(stdin: IO[bytes], frames: np.ndarray) -> None:
    """Pipe frames (f, h, w, 3) uint8 to ffmpeg as raw rgb24, one frame at a time."""
    for frame in frames:
        stdin.write(frame.tobytes())


def _run_encoder(cmd: list[str], frames: np.ndarray) -> None:
    """Run the ffmpeg command cmd with frames on its stdin; raise RuntimeError with its log if it fails."""
    logger.debug('running %s', shlex.join(cmd))
    with tempfile.TemporaryFile() as log_file:  # a file, not a pipe: a chatty ffmpeg cannot block on it
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            _feed(proc.stdin, frames)
        except BrokenPipeError:
            pass  # ffmpeg stopped reading: its exit status and log below say why
        except BaseException:
            proc.kill()  # the caller removes the temp file once ffmpeg is gone
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()  # EOF: ffmpeg flushes the encoder and finishes the file
            returncode = proc.wait()
        if returncode != 0:
            log_file.seek(0)
            log = log_file.read().decode(errors='replace').strip()
            raise RuntimeError(f'ffmpeg failed with exit status {returncode}: {log}\ncommand: {shlex.join(cmd)}')


def _read(path: str | os.PathLike, *output: str) -> tuple[bytes, str]:
    """Decode the first video stream of path into the given ffmpeg outputs; return (stdout, stderr)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no video file at {os.fspath(path)!r}')
    cmd = [_ffmpeg(), '-hide_banner', '-nostdin', '-nostats', '-i', f'file:{os.fspath(path)}']
    # passthrough keeps every decoded frame once: no duplicates or drops to force a constant rate
    cmd += ['-map', '0:v:0', '-fps_mode', 'passthrough', *output]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    stderr = result.stderr.decode(errors='replace')
    if result.returncode != 0:
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else f'exit status {result.returncode}'
        raise ValueError(f'ffmpeg cannot read {os.fspath(path)!r}: {reason}')
    return result.stdout, stderr


def _stream_info(stderr: str, path: str | os.PathLike) -> re.Match:
    """The first video stream line of ffmpeg's input dump, matched by _STREAM_RE."""
    match = _STREAM_RE.search(stderr)
    if match is None:
        raise ValueError(f'no video stream found in {os.fspath(path)!r}')
    return match


def _parse_ffmetadata(text: str) -> dict[str, str]:
    """Global tags (keys lower-cased) of ffmpeg's ffmetadata text, where a backslash escapes the next character."""
    lines, line, escaped = [], [], False
    for char in text:  # split into (char, escaped) lines; an escaped newline belongs to the value
        if escaped or char not in '\\\n':
            line.append((char, escaped))
            escaped = False
        elif char == '\\':
            escaped = True
        else:
            lines.append(line)
            line = []
    tags = {}
    for line in lines + [line]:
        if not line or line[0] in ((';', False), ('#', False)):
            continue  # blank or comment (the ';FFMETADATA1' header)
        if line[0] == ('[', False):
            break  # [CHAPTER] / [STREAM] sections follow the global tags
        split = next(i for i, (char, esc) in enumerate(line) if char == '=' and not esc)
        raw = ''.join(char for char, _ in line)
        tags[raw[:split].lower()] = raw[split + 1:]
    return tags


def probe_video(path: str | os.PathLike) -> dict:
    """codec, pix_fmt, width, height, frames (exact, by decoding), fps and comment (or None) of a video file."""
    metadata, stderr = _read(path, '-f', 'null', '-', '-f', 'ffmetadata', 'pipe:1')
    stream = _stream_info(stderr, path)
    fps = re.search(r'([\d.]+)(k?) fps', stream['rest']) or re.search(r'([\d.]+)(k?) tbr', stream['rest'])
    counts = re.findall(r'frame=\s*(\d+)', stderr)
    assert fps is not None and counts, f'cannot parse fps or frame count from ffmpeg output:\n{stderr}'
    return {
        'codec': stream['codec'],
        'pix_fmt': stream['pix_fmt'],
        'width': int(stream['width']),
        'height': int(stream['height']),
        'frames': int(counts[-1]),  # the final report counts every decoded frame
        'fps': float(fps[1]) * (1000 if fps[2] else 1),
        'comment': _parse_ffmetadata(metadata.decode(errors='replace')).get('comment'),
    }


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file into a uint8 array (f, h, w, 3) of RGB."""
    data, stderr = _read(path, '-f', 'rawvideo', '-pix_fmt', 'rgb24', 'pipe:1')
    stream = _stream_info(stderr, path)
    h, w = int(stream['height']), int(stream['width'])
    return np.frombuffer(data, np.uint8).reshape(-1, h, w, 3)
