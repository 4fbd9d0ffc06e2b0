"""Temporal attention over sliding windows of frames, for videos longer than the model was trained on.

FreeNoise (Qiu et al., ICLR 2024, Sec. 3.3): each temporal attention sees `window` frames at a time,
windows `stride` frames apart (the last one ending at the last frame), and a frame's output is the
weighted mean of its outputs in the windows that hold it. The weights favour a window's middle: a
triangle 1, 2, .., window/2, .., 2, 1 (diffusers' FreeNoise 'pyramid'). Memory and time then grow
linearly in frames; with one window over all frames the attention is exactly the plain one.
Where the attention has a form that does the windows and the blend in one call (frame_attention's
kernel, which takes each window's weights over its frames' totals: window_scales), that form serves.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (q, k, v, window, stride) -> the blended output, or None where it does not serve these tensors
AttendInWindows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], Optional[torch.Tensor]]


def window_starts(frames: int, window: int, stride: int) -> List[int]:
    """First frames of the windows: 0, stride, .. while a window fits, then one ending at the last frame."""
    if window >= frames:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


def window_weights(window: int, device=None) -> torch.Tensor:
    """(window,) weights of a window's frames: 1, 2, .., rising to the middle and falling again. Made on `device`:
    a copy from the host would wait for the GPU, which a CUDA graph's capture refuses (cuda_graphs.py)."""
    half = torch.arange(1, (window + 1) // 2 + 1, dtype=torch.float32, device=device)
    return torch.cat([half, half.flip(0)[window % 2:]])


def window_scales(frames: int, window: int, stride: int, device=None) -> torch.Tensor:
    """(windows, window) float32: the weight of each window's frames over the sum of the weights each frame
    gets from all its windows, so that a frame's output is the sum of its windows' scaled outputs. Window w
    starts at min(w stride, frames - window) (window_starts). Made on `device` without a copy from the host."""
    count = len(window_starts(frames, window, stride))
    starts = (torch.arange(count, device=device) * stride).clamp_(max=frames - window)
    weights = window_weights(window, device)
    place = torch.arange(frames, device=device)[:, None] - starts                      # (frames, windows)
    held = (place >= 0) & (place < window)
    total = torch.where(held, weights[place.clamp(0, window - 1)], 0).sum(1)        # (frames,)
    return weights / total[starts[:, None] + torch.arange(window, device=device)]


def windowed(attend: Attend, window: int, stride: int, in_windows: AttendInWindows | None = None) -> Attend:
    """`attend` over frames (q, k, v: (n, l frames, heads, d)) run window by window and blended; by
    `in_windows` in one call where it serves."""

    def attend_in_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        frames = q.shape[1]
        if window >= frames:
            return attend(q, k, v)
        if in_windows is not None:
            out = in_windows(q, k, v, window, stride)
            if out is not None:
                return out
        weights = window_weights(window, q.device).to(q.dtype).view(1, window, 1, 1)
        out = torch.zeros_like(q)
        total = torch.zeros(1, frames, 1, 1, device=q.device, dtype=q.dtype)
        for s in window_starts(frames, window, stride):
            part = slice(s, s + window)
            out[:, part] += attend(q[:, part], k[:, part], v[:, part]) * weights
            total[:, part] += weights
        return out / total

    attend_in_windows.window = (window, stride)
    return attend_in_windows
