"""Whether a Triton kernel of the package runs on a device, found by running it once."""

from __future__ import annotations

import warnings
from typing import Callable

import torch


def kernel_runs(probe: Callable[[torch.device], object], device: torch.device, fallback: str) -> bool:
    """Run probe(device), a small call of the kernel; if it raises, warn that `fallback` serves and say False.

    Triton builds a small C launcher on first use, which fails where no C
    compiler is installed (slim containers). torch.compile needs one anyway.
    """
    try:
        probe(device)
        return True
    except Exception as error:  # whatever Triton raises, the fallback still gives the same result
        warnings.warn(f'{fallback}: the Triton kernel failed on {device} ({error})')
        return False
