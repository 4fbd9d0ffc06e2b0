"""modelscope-t2v: ModelScope's text-to-video model, exact, fast and dependable.

Importing the package registers its pipeline, model and preprocessor in
ModelScope's registries (when ModelScope is installed), so
`pipeline('text-to-video-synthesis', model_dir)` runs through it.
"""

import logging

from .request import GenerationCancelled, GenerationRequest, NonFiniteError, parse_request
from .text_to_video import GenerationResult, TextToVideo

__version__ = '0.1.0'
__all__ = ['GenerationCancelled', 'GenerationRequest', 'GenerationResult', 'NonFiniteError', 'TextToVideo',
           'parse_request', '__version__']

try:
    from .pipeline import register as _register
    _register()
except Exception as _error:  # the networks and TextToVideo work without a usable ModelScope
    logging.getLogger(__name__).warning('not registered in ModelScope (%s: %s)', type(_error).__name__, _error)
