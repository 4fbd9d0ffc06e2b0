"""modelscope-t2v: ModelScope's text-to-video model, exact, fast and dependable.

Importing the package registers its pipeline, model and preprocessor in
ModelScope's registries, so `pipeline('text-to-video-synthesis', model_dir)`
runs through it: at once where ModelScope is imported already, else as soon as
the program imports it (a program that never does skips its seconds of import).
"""

import importlib
import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
import threading


def _is_command() -> bool:
    """Whether this process is the command line: the modelscope-t2v script or python -m modelscope_t2v[.batch]
    (torchrun's ranks), importing the package in its main thread."""
    argv = getattr(sys, 'orig_argv', [])   # Python 3.10+: the interpreter's own arguments
    module = next((b for a, b in zip(argv, argv[1:]) if a == '-m'), '')
    return ((os.path.basename(sys.argv[0]) == 'modelscope-t2v' or module.split('.')[0] == __name__)
            and threading.current_thread() is threading.main_thread())


def _exit_interrupted(signum=None, frame=None) -> None:
    """Ctrl-C during the command's imports (seconds: torch, then ModelScope): exit 130 with one line at once, as
    cli.guarded does later. At once, from the signal handler: a KeyboardInterrupt raised inside an import can
    be caught there or leave a half-imported module behind (numpy then recurses in its __getattr__)."""
    print('modelscope-t2v: interrupted', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


_previous_handler = signal.signal(signal.SIGINT, _exit_interrupted) if _is_command() else None
try:
    from .request import GenerationCancelled, GenerationRequest, NonFiniteError, parse_request
    from .text_to_video import GenerationResult, TextToVideo
finally:
    if _previous_handler is not None:
        signal.signal(signal.SIGINT, _previous_handler)

__version__ = '0.1.0'
__all__ = ['GenerationCancelled', 'GenerationRequest', 'GenerationResult', 'NonFiniteError', 'TextToVideo',
           'parse_request', '__version__']


def _register_in_modelscope() -> None:
    """Import .pipeline, which registers the classes in ModelScope's registries as it is imported."""
    try:
        importlib.import_module(__name__ + '.pipeline')
    except KeyboardInterrupt:
        if _is_command():
            _exit_interrupted()
        raise
    except Exception as error:  # the networks and TextToVideo work without a usable ModelScope
        logging.getLogger(__name__).warning('not registered in ModelScope (%s: %s)', type(error).__name__, error)


class _RegisterAfterModelScope(importlib.abc.MetaPathFinder):
    """On sys.meta_path until ModelScope is imported: its module is found as usual, and once its own code
    has run, this package's classes are registered, before the program's next line can build a pipeline."""

    def find_spec(self, name, path, target=None):
        if name != 'modelscope':
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)   # from the other finders
        if spec is not None and hasattr(spec.loader, 'exec_module'):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_in_modelscope()

            spec.loader.exec_module = exec_then_register
        return spec


if 'modelscope' in sys.modules:
    _register_in_modelscope()
else:
    sys.meta_path.insert(0, _RegisterAfterModelScope())
