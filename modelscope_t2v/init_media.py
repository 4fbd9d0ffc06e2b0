"""The starting video of video-to-video and the starting image of image-to-video: read and checked.

A video is a file path (any container ffmpeg reads), uint8 frames (f, h, w, 3), or latents
(1 or videos, c, f, h/8, w/8) already encoded. An image is a file path (PNG, JPEG, ...) or uint8
(h, w, 3). Checks happen before any model work; resizing and encoding happen in the engine.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch

from . import video_io

InitVideo = Union[np.ndarray, torch.Tensor]   # uint8 frames (f, h, w, 3), or float latents (n, c, f, h, w)


def init_video(value, key: str = 'init_video') -> InitVideo | None:
    """uint8 frames (f, h, w, 3) or float latents (n, c, f, h, w) of `value`; None for None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.ndim != 5 or 0 in value.shape:
            raise ValueError(f'{key} as latents must be a float tensor (1 or videos, channels, frames, height/8, '
                             f'width/8); got {value.dtype} of shape {tuple(value.shape)}')
        if not torch.isfinite(value).all():
            raise ValueError(f'{key} latents hold NaN or inf')
        return value
    frames = _read(value, key) if isinstance(value, (str, os.PathLike)) else value
    return _uint8_frames(frames, key, 'f, h, w, 3')


def init_image(value, key: str = 'init_image') -> np.ndarray | None:
    """uint8 (h, w, 3) of `value` (a path or an array); None for None."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        frames = _read(value, key)
        if len(frames) != 1:
            raise ValueError(f'{key}={os.fspath(value)!r} holds {len(frames)} frames; an image has one '
                             '(pass a video as init_video)')
        return frames[0]
    image = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    return _uint8_frames(image[None] if image.ndim == 3 else image, key, 'h, w, 3')[0]


def _read(path, key: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f'{key}={os.fspath(path)!r}: no such file')
    try:
        frames = video_io.read_frames(path)
    except ValueError as error:   # ffmpeg's own reason, e.g. "Invalid data found when processing input"
        raise ValueError(f'{key}={os.fspath(path)!r} is not a video or image ffmpeg can read: {error}') from None
    if len(frames) == 0:
        raise ValueError(f'{key}={os.fspath(path)!r} holds no frames')
    return frames


def _uint8_frames(frames, key: str, layout: str) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise TypeError(f'{key} must be a path, uint8 frames ({layout}) or latents; '
                        f'got {type(frames).__name__} {getattr(frames, "dtype", "")}'.rstrip())
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f'{key} must have shape ({layout}) with 3 RGB channels; got {frames.shape}')
    return frames
