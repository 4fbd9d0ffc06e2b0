"""Whether an AOTInductor package loads and runs on this GPU at all: the question behind compile_cache's refusal
on CUDA (text_to_video.check_compile_cache_device; docs/benchmarks.md, start-up).

    python bench/aoti_load_check.py

Each case builds a package of one float16 nn.Linear on CUDA, loads it and runs it, in a process of its own (a
segmentation fault ends only that case): the module as it is or called with its weights as inputs (as
compile_cache.WeightsAsInputs), loaded single-threaded (as compile_cache.load_package) or not. Prints each
case's exit code (-11: SIGSEGV), the stages it reached and its largest difference from eager.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import faulthandler, sys, torch
faulthandler.enable()
weights_as_inputs, single_threaded = sys.argv[1] == 'weights-as-inputs', sys.argv[2] == 'single-threaded'
linear = torch.nn.Linear(64, 64).cuda().half()
x = torch.randn(8, 64, device='cuda', dtype=torch.half)
names = [name for name, _ in linear.named_parameters()]

class WeightsAsInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.held = (linear,)

    def forward(self, weights, x):
        return torch.func.functional_call(self.held[0], dict(zip(names, weights)), (x,))

model, inputs = (WeightsAsInputs(), (list(linear.parameters()), x)) if weights_as_inputs else (linear, (x,))
exported = torch.export.export(model, inputs, strict=False)
path = torch._inductor.aoti_compile_and_package(exported, package_path=f'/tmp/aoti-load-check-{sys.argv[1]}.pt2',
                                               inductor_configs={'triton.autotune_at_compile_time': False})
print('built', flush=True)
run = torch._inductor.aoti_load_package(path, run_single_threaded=single_threaded)
print('loaded', flush=True)
print('ran, largest difference', float((run(*inputs) - linear(x)).abs().max()), flush=True)
'''


def main():
    for call in ('module', 'weights-as-inputs'):
        for threads in ('single-threaded', 'thread-safe'):
            result = subprocess.run([sys.executable, '-c', CHILD, call, threads], capture_output=True, text=True)
            print(f'{call}, {threads}: exit code {result.returncode}; ' + '; '.join(result.stdout.splitlines()),
                  flush=True)
            if result.returncode:
                errors = [line for line in result.stderr.splitlines() if 'Warning' not in line]
                print('\n'.join(errors[-12:]))


if __name__ == '__main__':
    main()
