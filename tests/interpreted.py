"""Run code with Triton's interpreter: the package's kernels on the CPU, executed with NumPy.

TRITON_INTERPRET=1 is read when a kernel is defined, hence a fresh process.
"""

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def run_interpreted(code: str) -> str:
    """Run `code` in a fresh Python with Triton's interpreter on; return its stdout."""
    env = {**os.environ, 'TRITON_INTERPRET': '1',
           'PYTHONPATH': os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get('PYTHONPATH', '')])}
    done = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# latents (videos, c, frames, h, w) the kernels' UNet tests run: the default 16 frames of 8x8 (64x64 pixels),
# and zeroscope_v2_576w's 24 frames at 40x72 pixels: 5x9 latents, 3x5 at the tiny UNet's deepest level
UNET_LATENTS = {'16x8x8': (2, 4, 16, 8, 8), '24x5x9': (1, 4, 24, 5, 9)}


def tiny_unet_kernel_vs_plain(switch: str, report: str = '', latents=UNET_LATENTS['16x8x8'], setup: str = '') -> list:
    """The tiny UNet3D (float32) run plain on `latents`, then again after `switch`, one line of code that
    routes a layer through its kernel (interpreted): [relative difference, then each `report` value].
    `setup`, one line of code, runs before both (`unet` is the UNet)."""
    out = run_interpreted(f'''
        import torch
        from modelscope_t2v.config import TINY
        from modelscope_t2v.models.unet3d import UNet3D
        from reference import randomize_, rel_err
        unet = randomize_(UNet3D(TINY.unet), 0).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn({tuple(latents)}, generator=g)
        context = torch.randn(x.shape[0], 77, TINY.unet.context_dim, generator=g)
        t = torch.tensor([981, 21][:x.shape[0]])
        {setup}
        with torch.no_grad():
            plain = unet(x, t, context)
            {switch}
            print(rel_err(unet(x, t, context), plain), {report})
    ''')
    return [float(value) for value in out.split()]
