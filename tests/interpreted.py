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
