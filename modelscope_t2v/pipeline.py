"""The ModelScope edge: Model, Preprocessor and Pipeline classes in ModelScope's registries.

They are registered under this package's own type name (PLUGIN_TYPE, used by
the repo's configuration.json) and in place of ModelScope's built-in
'latent-text-to-video-synthesis' types, so a model dir with the original
configuration.json runs here too. Through pipeline() the inputs follow the
built-in's rules (request.py, builtin_rules), and a model built by the
built-in's class is served over the same tensors.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
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
from . import model_folder, serving, weights
from .request import GenerationRequest, parse_request
from .serving import VideoFile
from .text_to_video import GenerationResult, TextToVideo

logger = logging.getLogger(__name__)

PLUGIN_TYPE = config_lib.PLUGIN_TYPE
BUILTIN_TYPE = config_lib.BUILTIN_TYPE
TASK = Tasks.text_to_video_synthesis
# ModelScope's own modules that register the built-in type; imported before ours replace it
BUILTIN_MODULES = ('modelscope.models.multi_modal.video_synthesis.text_to_video_synthesis_model',
                   'modelscope.pipelines.multi_modal.text_to_video_synthesis_pipeline')


DEVICE_NAMES = ('cpu', 'gpu', 'cuda', 'gpu:N', 'cuda:N')
# pipeline()'s keyword arguments that build the engine (TextToVideo.from_pretrained's, compile_unet its compile)
ENGINE_OPTIONS = ('compile_unet', 'compile_cache', 'cuda_graphs', 'low_memory')


def engine_options(kwargs: dict) -> dict:
    """TextToVideo.from_pretrained's and from_networks's options from pipeline()'s ENGINE_OPTIONS."""
    return {'compile': kwargs.get('compile_unet', False), 'compile_cache': kwargs.get('compile_cache', False),
            'cuda_graphs': kwargs.get('cuda_graphs', False), 'low_memory': kwargs.get('low_memory', False)}


def torch_device(name) -> torch.device:
    """ModelScope's device names ('gpu', 'gpu:1', 'cuda:0', 'cpu'; any case) -> a torch device; ValueError
    for any other name, or a GPU index this machine lacks."""
    text = str(name or 'gpu').lower()
    kind, _, index = text.partition(':')
    if kind not in ('cpu', 'gpu', 'cuda') or (index and (kind == 'cpu' or not index.isdigit())):
        raise ValueError(f'device={name!r} is not one of {", ".join(DEVICE_NAMES)} (N: the index of a GPU)')
    if kind == 'cpu':
        return torch.device('cpu')
    if not torch.cuda.is_available():
        logger.info('CUDA is not available; running on the CPU in float32')
        return torch.device('cpu')
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f'device={name!r}: this machine has {torch.cuda.device_count()} GPUs, '
                         f'0..{torch.cuda.device_count() - 1}')
    return torch.device('cuda', int(index)) if index else torch.device('cuda')


class TextToVideoModel(Model):
    """The three networks of a model dir, on the pipeline's device."""

    def __init__(self, model_dir: str, *args, engine: TextToVideo = None, **kwargs):
        super().__init__(model_dir, *args, **kwargs)
        base_model = kwargs.get('base_model')
        if base_model is not None:
            from .hub import resolve_model_dir
            base_model = resolve_model_dir(base_model)
        self.engine = engine or TextToVideo.from_pretrained(
            model_dir, device=torch_device(kwargs.get('device')), half_cache=kwargs.get('half_cache', False),
            base_model=base_model, **engine_options(kwargs))

    @classmethod
    def from_builtin(cls, builtin: Model, device: str = 'gpu', **kwargs) -> 'TextToVideoModel':
        """ModelScope's own TextToVideoSynthesis served here: our networks over its tensors (strictly
        loaded, no file read again); `kwargs` as pipeline()'s (compile_unet, compile_cache, cuda_graphs,
        low_memory)."""
        name = type(builtin).__name__
        if not all(hasattr(builtin, part) for part in ('sd_model', 'autoencoder', 'clip_encoder', 'model_dir')):
            raise TypeError(f'model must be a TextToVideoModel or ModelScope\'s TextToVideoSynthesis, not {name}')
        config = config_lib.load(builtin.model_dir)
        text = weights.select_text_keys(builtin.clip_encoder.model.state_dict(), *weights.text_key_rules(config),
                                        f'{name}.clip_encoder')
        networks = weights.build_networks(
            config, text, builtin.sd_model.state_dict(), builtin.autoencoder.state_dict(),
            sources=(f'{name}.clip_encoder', f'{name}.sd_model', f'{name}.autoencoder'))
        engine = TextToVideo.from_networks(config, networks, model_dir=builtin.model_dir,
                                           device=torch_device(device), **engine_options(kwargs))
        return cls(builtin.model_dir, engine=engine, device=device)

    def forward(self, request) -> GenerationResult:
        return self.engine(request)


class TextToVideoPreprocessor(Preprocessor):
    """Input dict + call options -> a checked GenerationRequest, with the defaults of `config` (the pipeline
    gives it its model's; ModelScope builds it from the model dir before the model is loaded)."""

    def __init__(self, model_dir: str = None, *args, config: config_lib.ModelConfig = None, **kwargs):
        super().__init__(*args, **{k: v for k, v in kwargs.items() if k == 'mode'})
        self.config = config

    def __call__(self, data, **options):
        return parse_request(data, self.config or config_lib.FULL, builtin_rules=True, **options)


class TextToVideoPipeline(Pipeline):
    """pipeline('text-to-video-synthesis', model_dir)({'text': ...}) -> {OUTPUT_VIDEO: path}."""

    def __init__(self, model, preprocessor=None, **kwargs):
        kwargs['auto_collate'] = False  # the request holds Python values, not a batch of tensors
        if isinstance(model, str) and is_configurationless_folder(model):   # ModelScope would not load it
            model = TextToVideoModel(model, **{**kwargs, 'device': kwargs.get('device', 'gpu')})
        super().__init__(model=model, preprocessor=preprocessor, **kwargs)
        if not isinstance(self.model, TextToVideoModel):   # built by ModelScope's own class
            options = {k: v for k, v in kwargs.items() if k in ENGINE_OPTIONS}
            self.model = TextToVideoModel.from_builtin(self.model, self.device_name, **options)
            self.models = [self.model]
        if not isinstance(self.preprocessor, TextToVideoPreprocessor):
            self.preprocessor = TextToVideoPreprocessor(config=self.model.engine.config)
        if self.preprocessor.config is None:
            self.preprocessor.config = self.model.engine.config

    def _sanitize_parameters(self, **options):
        return options, {}, {}  # every option is checked by the preprocessor

    def _check_input(self, input):
        """parse_request checks the input with ValueError/TypeError instead of asserts."""

    def preprocess(self, inputs, **options) -> Dict[str, Any]:
        return {'request': self.preprocessor(inputs, **options)}

    def forward(self, inputs: Dict[str, Any], **forward_params) -> Dict[str, Any]:
        return {'request': inputs['request'], 'result': self.model(inputs['request'])}

    def postprocess(self, inputs: Dict[str, Any], **post_params) -> Dict[str, Any]:
        result: GenerationResult = inputs['result']
        single = len(result.parameters) == 1
        pick = (lambda items: items[0]) if single else list  # noqa: E731
        paths = [returned_path(path, inputs['request'], single) for path in result.paths]
        out = {OutputKeys.OUTPUT_VIDEO: pick(paths) if paths else None,
               'parameters': pick(result.parameters)}
        if result.frames and not result.paths:
            out['frames'] = pick(result.frames)
        if result.latents is not None:
            out['latents'] = result.latents
        return out


def returned_path(path: str, request: GenerationRequest, single: bool):
    """OUTPUT_VIDEO for a written file: a VideoFile (str), or the caller's own os.PathLike for one video."""
    given = request.output_video
    if given is None or isinstance(given, str):
        return VideoFile(path, temporary=given is None)
    return given if single else pathlib.Path(path)


def register() -> None:
    """Put the classes in ModelScope's registries under both type names.

    The built-in's own modules are imported first where they can be (the
    pipeline's needs opencv), so their registrations come before ours, which
    replace them, and importing them later (TextToVideoSynthesis) is a no-op.
    ModelScope builds a type by first importing the module its lazy-import index
    names for it; pointing those entries at this module keeps it from importing
    the built-in one over ours.
    """
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:   # then a script cannot import it either
            logger.debug('%s not importable (%s)', module, error)
    serving.register()
    read_virtual_configurations()
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


def read_virtual_configurations() -> None:
    """Let ModelScope take a model folder without configuration.json that this package loads (diffusers
    layout; zeroscope's partial zs2_576w/) as a model dir whose configuration.json selects this plugin.

    pipeline() decides whether a path is a model dir with `is_official_hub_path` (a file check) and then
    reads configuration.json through Config.from_file, as the rest of ModelScope does: those two are
    wrapped, and answer differently only for such folders, and for a configuration.json that is not a JSON
    object (a ValueError that names it).
    """
    from modelscope.pipelines import builder
    from modelscope.utils.config import Config
    if getattr(Config.from_file, 'reads_virtual_configurations', False):
        return
    read, is_model_dir = Config.from_file, builder.is_official_hub_path

    def from_file(filename, *args, **kwargs):
        is_configuration = os.path.basename(os.fspath(filename)) == config_lib.CONFIG_FILE
        if is_configuration and is_configurationless_folder(os.path.dirname(os.fspath(filename))):
            virtual = config_lib.virtual_configuration_json()
            return Config(virtual, cfg_text=json.dumps(virtual), filename=os.fspath(filename))
        if is_configuration and os.path.isfile(filename):
            config_lib.read_json(filename)   # else ModelScope's error names no file, beside a stray traceback
        return read(filename, *args, **kwargs)

    def is_official_hub_path(path, *args, **kwargs):
        return (isinstance(path, str) and is_configurationless_folder(path)) or is_model_dir(path, *args, **kwargs)

    from_file.reads_virtual_configurations = True
    Config.from_file = staticmethod(from_file)
    builder.is_official_hub_path = is_official_hub_path


def is_configurationless_folder(path: str) -> bool:
    """A folder this package loads that has no configuration.json for ModelScope to read."""
    return (os.path.isdir(path) and not os.path.exists(os.path.join(path, config_lib.CONFIG_FILE))
            and model_folder.is_model_folder(path))


register()   # on import: the package imports this module once ModelScope is imported
