"""Whether an AOTInductor package loads and runs on this GPU at all: the question behind compile_cache's refusal
on CUDA (text_to_video.check_compile_cache_device; docs/benchmarks.md, start-up).

    python bench/aoti_load_check.py

Each case builds a package of one float16 nn.Linear on CUDA, loads it and runs it, in a process of its own (a
segmentation fault ends only that case): the module as it is or called with its weights as inputs (as
compile_cache.WeightsAsInputs), written to a path or into memory and then to a file (as compile_cache.build),
loaded single-threaded (as compile_cache.load_package) or not; and one float32 package on the CPU. Prints each
case's exit code (-11: SIGSEGV), the stages it reached and its largest difference from eager.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import faulthandler, io, sys, torch
faulthandler.enable()
torch.set_grad_enabled(False)   # inductor runs the call on real inputs while building, where out= needs no grad
weights_as_inputs, single_threaded = sys.argv[1] == 'weights-as-inputs', sys.argv[2] == 'single-threaded'
in_memory, device = sys.argv[3] == 'in-memory', sys.argv[4]
dtype = torch.half if device == 'cuda' else torch.float
linear = torch.nn.Linear(64, 64).to(device, dtype)
x = torch.randn(8, 64, device=device, dtype=dtype)
names = [name for name, _ in linear.named_parameters()]

class WeightsAsInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.held = (linear,)

    def forward(self, weights, x):
        return torch.func.functional_call(self.held[0], dict(zip(names, weights)), (x,))

model, inputs = (WeightsAsInputs(), (list(linear.parameters()), x)) if weights_as_inputs else (linear, (x,))
exported = torch.export.export(model, inputs, strict=False)
path = f'/tmp/aoti-load-check-{"-".join(sys.argv[1:])}.pt2'
package = io.BytesIO() if in_memory else path
torch._inductor.aoti_compile_and_package(exported, package_path=package,
                                        inductor_configs={'triton.autotune_at_compile_time': False})
if in_memory:
    with open(path, 'wb') as f:
        f.write(package.getvalue())
print('built', flush=True)
run = torch._inductor.aoti_load_package(path, run_single_threaded=single_threaded)
print('loaded', flush=True)
print('ran, largest difference', float((run(*inputs) - linear(x)).abs().max()), flush=True)
'''

# (call, loader, package destination, device); the last CUDA case is compile_cache's way; the CPU case tells a
# broken AOTInductor build (C++ compiler, linker) from a broken CUDA runtime
CASES = [('module', 'thread-safe', 'path', 'cuda'), ('module', 'single-threaded', 'path', 'cuda'),
         ('weights-as-inputs', 'single-threaded', 'path', 'cuda'), ('module', 'single-threaded', 'in-memory', 'cuda'),
         ('weights-as-inputs', 'single-threaded', 'in-memory', 'cuda'), ('module', 'single-threaded', 'path', 'cpu')]


def main():
    for case in CASES:
        result = subprocess.run([sys.executable, '-c', CHILD, *case], capture_output=True, text=True)
        print(f'{", ".join(case)}: exit code {result.returncode}; ' + '; '.join(result.stdout.splitlines()),
              flush=True)
        if result.returncode:
            errors = [line for line in result.stderr.splitlines() if 'Warning' not in line]
            print('\n'.join(errors[-12:]))


if __name__ == '__main__':
    main()
