"""What a compile-cache folder's AOTInductor packages hold: for each, its size, the weights copied into it (none
expected: weights are inputs, compile_cache.py) and which of the package's custom ops its code calls.

    python bench/aoti_probe.py FOLDER [--out probe.json]

A custom op that inductor does not lower (torch.library.custom_op: geglu, frame_conv, addmm_) appears by name in
the wrapper's C++ and in its JSON of calls for AOTInductor's proxy executor; a triton_op (frame_attention,
frame_attention_in_windows) is decomposed into its Triton kernels, which appear by their kernel names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile

import torch

OPS = ('geglu', 'frame_conv', 'addmm_', 'frame_attention', 'frame_attention_in_windows')


def describe(path: str) -> dict:
    """One package: its bytes, its constants and the custom ops and Triton kernels its code names."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        code = '\n'.join(archive.read(name).decode(errors='replace') for name in names
                         if name.endswith(('.cpp', '.json', '.py')))
    constants = torch._inductor.aoti_load_package(path, run_single_threaded=True).get_constant_fqns()
    return {'bytes': os.path.getsize(path), 'constants': len(constants),
            'custom_op_calls': {op: len(re.findall(rf'modelscope_t2v::{op}\b', code)) for op in OPS},
            'kernel_files': sorted({os.path.splitext(name)[1] for name in names}),
            'triton_kernels_named': sorted(set(re.findall(r'\b(_?frame_attention\w*|_?geglu\w*|_?frame_conv\w*)',
                                                          code)))[:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder')
    parser.add_argument('--out')
    args = parser.parse_args()
    import modelscope_t2v.models.unet3d  # noqa: F401  (registers the custom ops a package calls)
    report = {name: describe(os.path.join(args.folder, name))
              for name in sorted(os.listdir(args.folder)) if name.endswith('.pt2')}
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)
    else:
        json.dump(report, sys.stdout, indent=1)


if __name__ == '__main__':
    main()
