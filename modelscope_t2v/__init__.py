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
import sys


def _exit_if_command() -> None:
    """On Ctrl-C during these imports (seconds: torch, then ModelScope), exit 130 with one line, as cli.guarded
    does later, where this process is the command line: the modelscope-t2v script or python -m
    modelscope_t2v[.batch] (torchrun's ranks). Imported by any other program, the KeyboardInterrupt is its."""
    argv = getattr(sys, 'orig_argv', [])   # Python 3.10+: the interpreter's own arguments
    module = next((b for a, b in zip(argv, argv[1:]) if a == '-m'), '')
    if os.path.basename(sys.argv[0]) == 'modelscope-t2v' or module.split('.')[0] == __name__:
        print('modelscope-t2v: interrupted', file=sys.stderr, flush=True)
        sys.stdout.flush()
        # not SystemExit: Python 3.11 remembers a KeyboardInterrupt that passed through exec'd code (dataclasses
        # and namedtuples build theirs so, in many imports) and would end the process by SIGINT (status -2)
        os._exit(130)


try:
    from .request import GenerationCancelled, GenerationRequest, NonFiniteError, parse_request
    from .text_to_video import GenerationResult, TextToVideo
except KeyboardInterrupt:
    _exit_if_command()
    raise

__version__ = '0.1.0'
__all__ = ['GenerationCancelled', 'GenerationRequest', 'GenerationResult', 'NonFiniteError', 'TextToVideo',
           'parse_request', '__version__']


def _register_in_modelscope() -> None:
    """Import .pipeline, which registers the classes in ModelScope's registries as it is imported."""
    try:
        importlib.import_module(__name__ + '.pipeline')
    except KeyboardInterrupt:
        _exit_if_command()
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
