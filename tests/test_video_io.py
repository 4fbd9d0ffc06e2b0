"""Exact properties of the files video_io writes: codec, pixel format, size, frame count, fps, tags, atomicity."""
import json
import os
import pathlib
import re
import tempfile
import time

import numpy as np
import pytest

from conftest import MACHINE_TEMP_FOLDER
from modelscope_t2v import video_io

# Generation parameters as the pipeline stores them: JSON text with quotes, spaces and ffmetadata's escapes = ; # \
COMMENT = json.dumps({'prompt': 'a "cat" says \'hi\' = ; # \\ ok', 'seed': 42, 'steps': 50, 'guidance': 9.0})


def gradient_frames(f: int, h: int, w: int) -> np.ndarray:
    """Smooth uint8 RGB gradients (f, h, w, 3) that drift right by 4 px a frame."""
    t, y, x = np.ogrid[:f, :h, :w]
    channels = ((x + 4 * t) * 255 // (w + 4 * f), y * 255 // h + 0 * t, (x + y) * 255 // (w + h) + 0 * t)
    return np.stack(np.broadcast_arrays(*channels), axis=-1).astype(np.uint8)


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_mp4_h264_properties_and_round_trip(tmp_path):
    frames = gradient_frames(16, 256, 256)
    written = video_io.write_video(frames, tmp_path / 'out.mp4', fps=8, metadata={'comment': COMMENT})
    assert written == str(tmp_path / 'out.mp4')
    assert os.listdir(tmp_path) == ['out.mp4']  # the temp file was renamed, nothing else left
    assert video_io.probe_video(written) == {
        'codec': 'h264', 'pix_fmt': 'yuv420p', 'width': 256, 'height': 256,
        'frames': 16, 'fps': 8.0, 'comment': COMMENT,
    }  # fmt: skip
    data = pathlib.Path(written).read_bytes()
    assert data.index(b'moov') < data.index(b'mdat')  # +faststart: index before the media data
    # crf 18 on smooth gradients: measured 1.25 mean abs error (yuv420p rounding + H.264)
    assert mean_abs_error(video_io.read_frames(written), frames) < 3


def test_webm_vp9_properties_and_round_trip(tmp_path):
    frames = gradient_frames(16, 128, 160)
    written = video_io.write_video(frames, tmp_path / 'out.webm', fps=8, metadata={'comment': COMMENT, 'title': 'x'})
    assert video_io.probe_video(written) == {
        'codec': 'vp9', 'pix_fmt': 'yuv420p', 'width': 160, 'height': 128,
        'frames': 16, 'fps': 8.0, 'comment': COMMENT,
    }  # fmt: skip
    # default crf 30: measured 1.46 mean abs error
    assert mean_abs_error(video_io.read_frames(written), frames) < 4


def test_gif_palette_loops_forever(tmp_path):
    frames = gradient_frames(12, 64, 96)
    written = video_io.write_video(frames, tmp_path / 'out.gif', fps=8, metadata={'comment': COMMENT})
    probe = video_io.probe_video(written)
    assert (probe['codec'], probe['width'], probe['height'], probe['frames']) == ('gif', 96, 64, 12)
    assert probe['comment'] is None  # GIF has no tags; write_video logs that it dropped them
    assert probe['fps'] == pytest.approx(8, abs=0.5)  # GIF delays are whole centiseconds: 12.5 cs reads as 8.33 fps
    assert b'NETSCAPE2.0\x03\x01\x00\x00' in pathlib.Path(written).read_bytes()  # loop count 0 = forever
    # one 256-colour palette for smooth gradients, dithered: measured 8.2 mean abs error
    assert mean_abs_error(video_io.read_frames(written), frames) < 12


@pytest.mark.parametrize('ext', ['.mp4', '.webm'])
def test_multiline_comment_round_trips(tmp_path, ext):
    comment = 'line 1\nline 2 = a; b # c \\\n\ttabbed, é 猫'
    written = video_io.write_video(gradient_frames(2, 16, 16), tmp_path / f'c{ext}', metadata={'comment': comment})
    assert video_io.probe_video(written)['comment'] == comment


def test_probe_rejects_a_file_that_is_not_video(tmp_path):
    (tmp_path / 'text.mp4').write_text('not a video')
    with pytest.raises(ValueError, match='text.mp4'):
        video_io.probe_video(tmp_path / 'text.mp4')


@pytest.mark.parametrize('ext', ['.mp4', '.webm'])
def test_odd_size_is_padded_to_even_by_repeating_the_edge(tmp_path, ext):
    frames = gradient_frames(4, 63, 65)
    probe = video_io.probe_video(video_io.write_video(frames, tmp_path / f'odd{ext}'))
    assert (probe['width'], probe['height'], probe['frames']) == (66, 64, 4)
    decoded = video_io.read_frames(tmp_path / f'odd{ext}')  # measured errors below: 1.3 to 1.7
    assert mean_abs_error(decoded[:, :63, :65], frames) < 4
    assert mean_abs_error(decoded[:, :63, 65], frames[:, :, 64]) < 4  # padded column repeats the last one
    assert mean_abs_error(decoded[:, 63, :65], frames[:, 62]) < 4  # padded row repeats the last one


def test_gif_keeps_odd_size(tmp_path):
    probe = video_io.probe_video(video_io.write_video(gradient_frames(3, 63, 65), tmp_path / 'odd.gif'))
    assert (probe['width'], probe['height'], probe['frames']) == (65, 63, 3)


def test_fractional_fps(tmp_path):
    probe = video_io.probe_video(video_io.write_video(gradient_frames(6, 32, 32), tmp_path / 'f.mp4', fps=7.5))
    assert (probe['fps'], probe['frames']) == (7.5, 6)


@pytest.mark.parametrize(
    'frames, error, message',
    [
        (gradient_frames(4, 32, 32).astype(np.float32), TypeError, 'float32'),
        (gradient_frames(4, 32, 32).tolist(), TypeError, 'list'),
        (gradient_frames(4, 32, 32)[..., 0], ValueError, r'\(4, 32, 32\)'),
        (np.zeros((4, 32, 32, 4), np.uint8), ValueError, r'\(4, 32, 32, 4\)'),
        (np.zeros((0, 32, 32, 3), np.uint8), ValueError, r'\(0, 32, 32, 3\)'),
    ],
)
def test_bad_frames_raise_before_writing(tmp_path, frames, error, message):
    with pytest.raises(error, match=message):
        video_io.write_video(frames, tmp_path / 'out.mp4')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    'kwargs, error, message',
    [
        ({'fps': 0}, ValueError, 'fps'),
        ({'fps': float('nan')}, ValueError, 'nan'),
        ({'fps': '8'}, TypeError, "'8'"),
        ({'quality': 52}, ValueError, r'\[0, 51\]'),
        ({'quality': 18.5}, TypeError, '18.5'),
        ({'metadata': {'parameters': '{}'}}, ValueError, "'parameters'.*comment"),
        ({'metadata': {'comment': {'seed': 1}}}, TypeError, 'dict'),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        video_io.write_video(gradient_frames(2, 16, 16), tmp_path / 'out.mp4', **kwargs)
    assert os.listdir(tmp_path) == []


def wait_for_partial_file(folder: pathlib.Path, timeout_s: float = 20) -> str:
    """Name of the encoder's temp file in folder, polled until ffmpeg has created it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        partial = [name for name in os.listdir(folder) if '.partial-' in name]
        if partial:
            return partial[0]
        time.sleep(0.01)
    raise AssertionError(f'ffmpeg created no temp file in {folder} within {timeout_s} s')


@pytest.mark.parametrize('error', [RuntimeError, KeyboardInterrupt])
def test_failure_mid_encode_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, error):
    target = tmp_path / 'out.mp4'
    target.write_bytes(b'previous video')
    seen, real_feed = [], video_io._feed

    def feed_then_fail(stdin, frames):
        real_feed(stdin, frames[:8])
        stdin.flush()
        seen.append(wait_for_partial_file(tmp_path))
        raise error('caller stopped')

    monkeypatch.setattr(video_io, '_feed', feed_then_fail)
    with pytest.raises(error, match='caller stopped'):
        video_io.write_video(gradient_frames(16, 64, 64), target)
    assert seen[0].startswith('.out.partial-') and seen[0].endswith('.mp4')  # the temp file existed mid-encode
    assert os.listdir(tmp_path) == ['out.mp4']
    assert target.read_bytes() == b'previous video'


def test_encoder_error_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / 'out.mp4'
    target.write_bytes(b'previous video')
    monkeypatch.setattr(video_io, '_codec_args', lambda ext, quality: ['-c:v', 'no_such_encoder', '-f', 'mp4'])
    with pytest.raises(RuntimeError, match='no_such_encoder'):
        video_io.write_video(gradient_frames(16, 64, 64), target)
    assert os.listdir(tmp_path) == ['out.mp4']
    assert target.read_bytes() == b'previous video'


def test_successful_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / 'out.mp4'
    target.write_bytes(b'previous video')
    video_io.write_video(gradient_frames(3, 32, 32), target)
    assert video_io.probe_video(target)['frames'] == 3
    assert os.listdir(tmp_path) == ['out.mp4']


def test_validate_output_path(tmp_path):
    assert video_io.validate_output_path(tmp_path / 'a.mp4') == tmp_path / 'a.mp4'
    assert video_io.validate_output_path(str(tmp_path / 'a.WEBM')) == tmp_path / 'a.WEBM'
    missing = str(tmp_path / 'missing' / 'a.mp4')
    with pytest.raises(ValueError, match=f'{re.escape(missing)}.*does not exist'):
        video_io.validate_output_path(missing)
    with pytest.raises(ValueError, match=r"'.avi'.*\.mp4, \.mkv, \.mov, \.webm, \.gif"):
        video_io.validate_output_path(tmp_path / 'a.avi')
    (tmp_path / 'dir.mp4').mkdir()
    with pytest.raises(ValueError, match='is a folder'):
        video_io.validate_output_path(tmp_path / 'dir.mp4')
    with pytest.raises(TypeError, match='int'):
        video_io.validate_output_path(3)
    assert os.listdir(tmp_path) == ['dir.mp4']


def test_temporary_video_path():
    paths = {video_io.temporary_video_path() for _ in range(3)} | {video_io.temporary_video_path('.gif')}
    assert len(paths) == 4
    for path in paths:
        assert os.path.dirname(path) == tempfile.gettempdir() and not os.path.exists(path)
        assert path.endswith(('.mp4', '.gif'))
    with pytest.raises(ValueError, match="'.avi'"):
        video_io.temporary_video_path('.avi')


def test_probe_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.mp4'):
        video_io.probe_video(tmp_path / 'nope.mp4')


# --- what can fail is found before any encoding; temporary files always have an owner -----------------

def in_unprivileged_child(check) -> str:
    """The message of the error `check()` raises, run as user nobody in a forked child: root writes into a
    read-only folder mode, as a user does not (only a read-only mount stops root)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: no pytest machinery from here on, only os._exit
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            check()
            message = 'no error'
        except BaseException as error:  # noqa: B036  (the child reports any error, then exits)
            message = f'{type(error).__name__}: {error}'
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    return message


def test_read_only_folder_is_refused_before_encoding():
    folder = pathlib.Path(tempfile.mkdtemp(dir=MACHINE_TEMP_FOLDER))   # user nobody must reach it
    try:
        folder.chmod(0o555)
        if os.geteuid() == 0:
            message = in_unprivileged_child(lambda: video_io.validate_output_path(folder / 'a.mp4'))
        else:
            with pytest.raises(ValueError) as info:
                video_io.validate_output_path(folder / 'a.mp4')
            message = f'ValueError: {info.value}'
        assert message == (f"ValueError: output path '{folder}/a.mp4': folder '{folder}' is not writable "
                           '(Permission denied)')
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)
        folder.rmdir()


def test_nul_and_over_long_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"holds a NUL character"):
        video_io.validate_output_path(str(tmp_path / 'a\0b.mp4'))
    # 255 bytes per name on this file system; the temporary name '.NAME.partial-XXXXXXXX.EXT' adds 18
    assert os.pathconf(tmp_path, 'PC_NAME_MAX') == 255
    video_io.validate_output_path(tmp_path / ('a' * 233 + '.mp4'))                 # 237 bytes: fits
    with pytest.raises(ValueError, match=r'is 238 bytes long; .* up to 255 bytes, and the temporary name '
                                         r'adds 18: at most 237'):
        video_io.validate_output_path(tmp_path / ('a' * 234 + '.mp4'))
    with pytest.raises(ValueError, match=r'is 304 bytes long'):
        video_io.validate_output_path(tmp_path / ('a' * 300 + '.mp4'))
    with pytest.raises(ValueError, match=r'is 302 bytes long'):   # bytes, not characters: é is 2 in UTF-8
        video_io.validate_output_path(tmp_path / ('é' * 149 + '.mp4'))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('fps, ok', [(0.01, True), (240, True), (0.0099, False), (1e-300, False), (240.5, False)])
def test_fps_range_is_what_every_container_writes(tmp_path, fps, ok):
    """0.01 fps (a frame of 100 s) is written exactly by all five containers; 1e-300 passed the old check
    and then made ffmpeg fail."""
    if not ok:
        with pytest.raises(ValueError, match=r'fps must be in \[0\.01, 240\.0\]'):
            video_io.write_video(gradient_frames(2, 16, 16), tmp_path / 'a.mp4', fps=fps)
        return
    for ext in video_io.CONTAINERS:
        probed = video_io.probe_video(video_io.write_video(gradient_frames(2, 16, 16), tmp_path / f'a{ext}',
                                                           fps=fps))
        assert probed['fps'] == (100.0 if ext == '.gif' and fps == 240 else fps), ext  # GIF's delays: >= 1 cs


def test_cleanup_error_does_not_hide_the_encoder_error(tmp_path, monkeypatch, caplog):
    """On a read-only mount unlink fails with EROFS even for a file never created: the error raised must
    still be ffmpeg's."""
    real_unlink = os.unlink

    def read_only_unlink(path, *args, **kwargs):
        if '.partial-' in os.fspath(path):
            raise OSError(30, 'Read-only file system', os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, 'unlink', read_only_unlink)
    monkeypatch.setattr(video_io, '_codec_args', lambda ext, quality: ['-c:v', 'no_such_encoder', '-f', 'mp4'])
    with pytest.raises(RuntimeError, match='no_such_encoder'):
        video_io.write_video(gradient_frames(2, 16, 16), tmp_path / 'out.mp4')
    assert 'could not remove the temporary' in caplog.text and 'Read-only file system' in caplog.text


def test_stale_partial_files_are_removed_at_the_next_write(tmp_path):
    """What a writer killed with SIGKILL left: removed once unmodified for an hour (scratch.STALE_AFTER_S);
    a younger one may be a live writer's and stays, as does any name not of the pattern."""
    hour = 3600
    names = {'.a.partial-0123abcd.mp4': 2 * hour, '.b c.partial-89abcdef.GIF': hour + 5,
             '.c.partial-00000000.webm': hour - 60, '.d.partial-0123abcd.txt': 2 * hour, 'e.partial-0123abcd.mp4': 2 * hour}
    now = time.time()
    for name, age in names.items():
        (tmp_path / name).write_bytes(b'half a video')
        os.utime(tmp_path / name, (now - age, now - age))
    video_io.write_video(gradient_frames(2, 16, 16), tmp_path / 'out.mp4')
    assert sorted(os.listdir(tmp_path)) == ['.c.partial-00000000.webm', '.d.partial-0123abcd.txt',
                                            'e.partial-0123abcd.mp4', 'out.mp4']
