"""Each Triton kernel is probed once; where it cannot run, it warns and leaves the plain path."""

import warnings

import pytest
import torch

from modelscope_t2v.models import frame_attention, frame_conv, geglu


@pytest.mark.parametrize('kernel, fallback', [(geglu, 'runs on F.linear'), (frame_attention, 'runs on SDPA'),
                                             (frame_conv, 'runs as a GEMM and a shifted sum')])
def test_a_kernel_that_cannot_run_warns_and_leaves_the_plain_path(kernel, fallback):
    kernel.kernel_works.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert kernel.kernel_works(torch.device('cpu')) is False   # Triton has no CPU driver
    assert any(fallback in str(w.message) for w in caught)
