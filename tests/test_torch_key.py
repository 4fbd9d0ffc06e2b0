"""torch_key: inductor's torch_key kept in the compile cache's folder for a later process with the same torch files."""

import os
import subprocess
import sys
import textwrap

from modelscope_t2v import torch_key
from modelscope_t2v.torch_key import key_path, remember_torch_key, restore_torch_key, torch_files_stamp


def later_process_key(folder: str) -> list:
    """[restore_torch_key's answer, torch_key() in hex] in a fresh interpreter."""
    code = f'''
        from modelscope_t2v.torch_key import restore_torch_key
        restored = restore_torch_key({folder!r})
        from torch._inductor.codecache import torch_key
        print(restored, torch_key().hex())
    '''
    done = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_later_process_takes_the_key_written_for_its_torch_files(tmp_path):
    noted = 'ab' * 32   # not torch's real key: a later process shows that it took it from the file
    with open(key_path(str(tmp_path)), 'w') as f:
        f.write(noted + '\n')
    assert later_process_key(str(tmp_path)) == ['True', noted]


def test_without_a_file_the_key_is_computed_and_remember_writes_it(tmp_path):
    restored, computed = later_process_key(str(tmp_path))
    assert restored == 'False' and len(computed) == 64
    remember_torch_key(str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(key_path(str(tmp_path)))]
    with open(key_path(str(tmp_path))) as f:
        assert f.read() == computed + '\n'   # this process's key is torch's, as the fresh one computed it
    assert later_process_key(str(tmp_path)) == ['True', computed]


def test_the_stamp_changes_with_a_python_file_or_an_inductor_file_and_not_with_others(tmp_path):
    root = tmp_path / 'torch'
    files = {'nn/linear.py': 'x = 1\n', '_inductor/script.ld': 'a', 'lib/libtorch.so': 'b', '__pycache__/a.pyc': 'c'}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    stamp = torch_key.torch_files_stamp.__wrapped__
    first = stamp(str(root))
    assert len(first) == 32 and first != torch_files_stamp()
    (root / 'lib/libtorch.so').write_text('changed')
    (root / '__pycache__/a.pyc').write_text('changed')
    assert stamp(str(root)) == first
    (root / 'nn/linear.py').write_text('x = 2\n')   # same size: its modification time tells
    os.utime(root / 'nn/linear.py', ns=(1, 1))
    second = stamp(str(root))
    assert second != first
    (root / '_inductor/script.ld').write_text('ab')
    assert stamp(str(root)) not in (first, second)


def test_a_damaged_file_is_not_taken(tmp_path):
    with open(key_path(str(tmp_path)), 'w') as f:
        f.write('not hex\n')
    assert restore_torch_key(str(tmp_path)) is False
