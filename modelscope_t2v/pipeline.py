"""The ModelScope edge: Model, Preprocessor and Pipeline classes in ModelScope's registries.

They are registered under this package's own type name (PLUGIN_TYPE, used by
the repo's configuration.json) and in place of ModelScope's built-in
'latent-text-to-video-synthesis' types, so a model dir with the original
configuration.json runs here too.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from modelscope.models.base import Model
from modelscope.models.builder import MODELS
from modelscope.outputs import OutputKeys
from modelscope.pipelines.base import Pipeline
from modelscope.pipelines.builder import PIPELINES
from modelscope.preprocessors.base import PREPROCESSOR_MAP, Preprocessor
from modelscope.preprocessors.builder import PREPROCESSORS
from modelscope.utils.ast_utils import INDEX_KEY
from modelscope.utils.constant import Fields, Tasks
from modelscope.utils.import_utils import LazyImportModule

from . import config as config_lib
from .request import parse_request
from .text_to_video import GenerationResult, TextToVideo

logger = logging.getLogger(__name__)

PLUGIN_TYPE = config_lib.PLUGIN_TYPE
BUILTIN_TYPE = config_lib.BUILTIN_TYPE
TASK = Tasks.text_to_video_synthesis


def torch_device(name) -> torch.device:
    """ModelScope's device names ('gpu', 'gpu:1', 'cuda:0', 'cpu') -> a torch device."""
    name = str(name or 'gpu')
    if name.startswith('gpu'):
        name = 'cuda' + name[3:]
    if name.startswith('cuda') and not torch.cuda.is_available():
        logger.info('CUDA is not available; running on the CPU in float32')
        return torch.device('cpu')
    return torch.device(name)


class TextToVideoModel(Model):
    """The three networks of a model dir, on the pipeline's device."""

    def __init__(self, model_dir: str, *args, **kwargs):
        super().__init__(model_dir, *args, **kwargs)
        self.engine = TextToVideo.from_pretrained(model_dir, device=torch_device(kwargs.get('device')),
                                                  compile=kwargs.get('compile_unet', False),
                                                  low_memory=kwargs.get('low_memory', False),
                                                  half_cache=kwargs.get('half_cache', False))

    def forward(self, request) -> GenerationResult:
        return self.engine(request)


class TextToVideoPreprocessor(Preprocessor):
    """Input dict + call options -> a checked GenerationRequest."""

    def __init__(self, model_dir: str = None, *args, config: config_lib.ModelConfig = None, **kwargs):
        super().__init__(*args, **{k: v for k, v in kwargs.items() if k == 'mode'})
        self.config = config or (config_lib.load(model_dir) if model_dir else config_lib.FULL)

    def __call__(self, data, **options):
        return parse_request(data, self.config, **options)


class TextToVideoPipeline(Pipeline):
    """pipeline('text-to-video-synthesis', model_dir)({'text': ...}) -> {OUTPUT_VIDEO: path}."""

    def __init__(self, model, preprocessor=None, **kwargs):
        kwargs['auto_collate'] = False  # the request holds Python values, not a batch of tensors
        super().__init__(model=model, preprocessor=preprocessor, **kwargs)
        if not isinstance(self.preprocessor, TextToVideoPreprocessor):
            self.preprocessor = TextToVideoPreprocessor(config=self.model.engine.config)

    def _sanitize_parameters(self, **options):
        return options, {}, {}  # every option is checked by the preprocessor

    def _check_input(self, input):
        """parse_request checks the input with ValueError/TypeError instead of asserts."""

    def preprocess(self, inputs, **options) -> Dict[str, Any]:
        return {'request': self.preprocessor(inputs, **options)}

    def forward(self, inputs: Dict[str, Any], **forward_params) -> Dict[str, Any]:
        return {'result': self.model(inputs['request'])}

    def postprocess(self, inputs: Dict[str, Any], **post_params) -> Dict[str, Any]:
        result: GenerationResult = inputs['result']
        single = len(result.parameters) == 1
        pick = (lambda items: items[0]) if single else list  # noqa: E731
        out = {OutputKeys.OUTPUT_VIDEO: pick(result.paths) if result.paths else None,
               'parameters': pick(result.parameters)}
        if result.frames and not result.paths:
            out['frames'] = pick(result.frames)
        if result.latents is not None:
            out['latents'] = result.latents
        return out


def register() -> None:
    """Put the classes in ModelScope's registries under both type names.

    ModelScope builds a type by first importing the module its lazy-import index
    names for it; pointing those entries at this module keeps it from importing
    the built-in one (which needs opencv and would register its classes over ours).
    """
    index = LazyImportModule.get_ast_index()[INDEX_KEY]
    here = {'filepath': __file__, 'imports': [], 'module': __name__}
    for type_name in (PLUGIN_TYPE, BUILTIN_TYPE):
        MODELS.register_module(TASK, module_name=type_name, force=True)(TextToVideoModel)
        PIPELINES.register_module(TASK, module_name=type_name, force=True)(TextToVideoPipeline)
        PREPROCESSORS.register_module(Fields.multi_modal, module_name=type_name,
                                      force=True)(TextToVideoPreprocessor)
        PREPROCESSOR_MAP[(type_name, TASK)] = type_name
        for registry, group in (('MODELS', TASK), ('PIPELINES', TASK), ('PREPROCESSORS', Fields.multi_modal)):
            index[(registry, group, type_name)] = here
