"""TextToVideo: the three networks of a model dir and the generation entry point.

Framework-free (no modelscope import): pipeline.py wraps it for ModelScope,
the CLI and the demo call it through that pipeline.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from . import config as config_lib
from . import model_folder, tokenizer, video_io
from .compile_cache import CompileCache, compiled_calls, preload_key
from .cuda_graphs import capture_calls
from .half_cache import HALF_DTYPES, load_networks_cached
from .lora.apply import LoraStack
from .lora.formats import LoraWeights, read_lora
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import OpenCLIPTextEncoder
from .models.unet3d import UNet3D
from .request import GenerationCancelled, GenerationRequest, NonFiniteError, numbered_paths
from .sampling import denoise, guided, reschedule_noise
from .schedulers import draws_step_noise, import_diffusers_meanwhile, make_scheduler, uses_guidance
from .weights import placed

logger = logging.getLogger(__name__)

# Frames the autoencoder decodes at once on a GPU: bounds the decoder's activations
# (about 120 MB a frame at 256x256 in half precision) at no measurable cost in speed.
CUDA_DECODE_CHUNK_FRAMES = 4
LOW_MEMORY_DECODE_CHUNK_FRAMES = 1
REQUEST_LORA = 'request '   # the names of a request's own LoRAs start so
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
FAST_COMPILE_MODE = 'reduce-overhead'   # with CUDA graphs: the fastest path measured (docs/benchmarks.md)


@dataclass
class GenerationResult:
    parameters: List[dict]                   # what each video was made with
    paths: List[str] = field(default_factory=list)        # output_type 'video'
    frames: List[np.ndarray] = field(default_factory=list)  # uint8 (f, h, w, 3), 'video'/'frames'
    latents: Optional[torch.Tensor] = None   # (n, c, f, h/8, w/8), 'latents'


def default_device_and_dtype(device=None, dtype=None):
    """CUDA in half precision when there is a GPU, else the CPU in float32."""
    device = torch.device(device if device is not None else ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dtype is None:
        dtype = torch.float16 if device.type == 'cuda' else torch.float32
    return device, dtype


class TextToVideo:
    """Prompt -> video with the original's networks and defaults."""

    def __init__(self, config: config_lib.ModelConfig, text_encoder: OpenCLIPTextEncoder,
                 unet: UNet3D, autoencoder: AutoencoderKL, model_dir: str = '', device=None, dtype=None,
                 low_memory: bool = False):
        self.config = config
        self.model_dir = model_dir
        self.device, self.dtype = default_device_and_dtype(device, dtype)
        # low_memory: the text encoder and the autoencoder wait on the CPU, and visit the device for their stage
        self.low_memory = low_memory
        resting = torch.device('cpu') if low_memory else self.device
        self.text_encoder = placed(text_encoder.eval().requires_grad_(False), resting, self.dtype)
        self.unet = placed(unet.eval().requires_grad_(False), self.device, self.dtype)
        self.autoencoder = placed(autoencoder.eval().requires_grad_(False), resting, self.dtype)
        self._lock = threading.Lock()        # held by the running generation (generating()) and by LoRA changes
        self._generating_thread = None       # the thread that holds it
        self.loras = LoraStack(lambda: {'unet': self.unet, 'text': self.text_encoder})   # lora/apply.py
        self.compile_cache = None            # its CompileCache, where compile_networks uses one

    @classmethod
    def from_pretrained(cls, model_dir: str, device=None, dtype=None, compile: bool | str = False,
                        low_memory: bool = False, half_cache: bool | str = False,
                        base_model: str | None = None, compile_cache: bool | str = False,
                        cuda_graphs: bool = False) -> 'TextToVideo':
        """Build the networks of `model_dir` from its files (strictly) onto the device.

        model_dir: a folder in the original layout or diffusers' (model_folder.py).
        compile: False, True or a torch.compile mode (COMPILE_MODES; True is
            'default'). On CUDA, compile_networks(mode): minutes once per process
            (less with inductor's on-disk cache warm), then about 3x faster per
            generation.
        compile_cache: True or a folder: keep what compiling makes on disk, so that a
            later process on this machine loads it instead of tracing the networks
            again (compile_cache.py; True: in inductor's cache folder), on a thread
            that starts here, while the weights load.
        cuda_graphs: on CUDA, without compile, replay each network's eager kernels
            from CUDA graphs (capture_graphs): seconds of capture instead of
            minutes of compiling, and no waiting for the host's kernel launches.
        low_memory: keep the text encoder and autoencoder on the CPU between their
            uses and decode one frame at a time (docs/benchmarks.md: memory options).
        half_cache: True or a folder: read the weights from a float16/bfloat16
            safetensors copy, written there on first use (half_cache.py).
        base_model: a folder with the original files that a partial original-format
            model_dir lacks (zeroscope's zs2_576w/ has no autoencoder).
        """
        check_compile_options(compile, compile_cache, cuda_graphs)   # bad values are refused before loading
        device, dtype = default_device_and_dtype(device, dtype)
        folder = model_folder.open_folder(model_dir, base_model, half=dtype in HALF_DTYPES)
        if compile_cache and compile_mode(compile) and device.type == 'cuda':   # its artefacts load meanwhile
            compile_cache = open_compile_cache(compile_cache, (folder.config, dtype, device, compile_mode(compile),
                                                               low_memory))
        importing = import_diffusers_meanwhile()   # the loading below imports no module of its own
        try:
            if half_cache and dtype in HALF_DTYPES:
                cache_dir = None if half_cache is True else half_cache
                # an engine on a GPU without low_memory copies every tensor there: the CPU ones are the writer's
                resting = torch.device('cpu') if low_memory else device    # as __init__ places the networks
                networks = load_networks_cached(folder, dtype, cache_dir,
                                                write_behind=device.type == 'cuda' and not low_memory,
                                                devices=(resting, device, resting))
            else:
                if half_cache:
                    logger.warning('half_cache ignored: it holds float16/bfloat16 weights, and this run is %s',
                                   dtype)
                networks = model_folder.load_networks(folder)
            return cls.from_networks(folder.config, networks, model_dir, device, dtype, compile, low_memory,
                                     compile_cache, cuda_graphs)
        except BaseException:
            if isinstance(compile_cache, CompileCache):
                compile_cache.cancel_preloads()
            raise
        finally:
            importing.join()

    @classmethod
    def from_networks(cls, config: config_lib.ModelConfig, networks, model_dir: str = '', device=None,
                      dtype=None, compile: bool | str = False, low_memory: bool = False,
                      compile_cache: bool | str = False, cuda_graphs: bool = False) -> 'TextToVideo':
        """An engine over (text encoder, UNet, autoencoder) already built; options as from_pretrained's."""
        check_compile_options(compile, compile_cache, cuda_graphs)
        engine = cls(config, *networks, model_dir=model_dir, device=device, dtype=dtype, low_memory=low_memory)
        mode = compile_mode(compile)
        if engine.device.type == 'cuda' and mode:
            engine.compile_networks(mode, compile_cache)
        elif engine.device.type == 'cuda' and cuda_graphs:
            engine.capture_graphs()
        return engine

    def compile_networks(self, mode: str, compile_cache: bool | str = False) -> None:
        """torch.compile the networks in place (from_pretrained's compile=, with compile_options): the UNet
        channels-last, its temporal convs as GEMMs, in `mode`; the text encoder in `mode` too, unless low_memory
        (a CUDA graph would record again each time its weights come back from the CPU); the autoencoder's
        decoder in mode 'reduce-overhead' where `mode` has CUDA graphs and not low_memory, else in mode
        'default'. Checkpoint keys are unchanged. With compile_cache, each network's blocks run through compiled
        artefacts kept on disk instead, built in parallel processes (compile_cache.py)."""
        use_torchs_ptxas()
        graphs = compile_options(mode).get('triton.cudagraphs') and not self.low_memory
        decoder_options = compile_options('reduce-overhead' if graphs else 'default')
        if compile_cache:
            cache = self.compile_cache = (compile_cache if isinstance(compile_cache, CompileCache) else
                                          open_compile_cache(compile_cache))
            cache.compile(self.unet.to_channels_last(), compile_options(mode))
            self.autoencoder.compile_decoder(decoder_options, compile=cache.compile)
            if not self.low_memory:
                cache.compile(self.text_encoder, compile_options(mode))
            return
        self.unet = torch.compile(self.unet.to_channels_last(), options=compile_options(mode), dynamic=False)
        self.autoencoder.compile_decoder(decoder_options)
        if not self.low_memory:
            self.text_encoder.compile(dynamic=False, options=compile_options(mode))

    def capture_graphs(self) -> None:
        """Replay each network's calls from CUDA graphs of its eager kernels (cuda_graphs.capture_calls), in place:
        the UNet, and unless low_memory (whose weights move between uses) the text encoder and the decoder. Each
        kind of call is captured at its first call; the frames are eager's."""
        capture_calls(self.unet)
        if not self.low_memory:
            capture_calls(self.text_encoder)
            self.autoencoder.replay_decoder(capture_calls)

    def stop_compiling(self) -> None:
        """From now on a call of a new kind (another video size, guidance off) runs eager rather than compiling
        for minutes: torch.compile's stance 'eager_on_recompile'; with compile_cache, what is on disk still
        loads and nothing new is built. For servers, after compiling what they serve most (demo/app.py)."""
        torch.compiler.set_stance('eager_on_recompile')
        for network in (self.unet, self.text_encoder, self.autoencoder.decoder):
            for calls in compiled_calls(network):
                calls.builds = False

    @torch.no_grad()
    def encode_prompts(self, prompts, negatives=None) -> tuple:
        """(context, uncond) in the engine's dtype, each (b, 77, width), from one text-encoder pass;
        uncond is None without negative prompts (guidance off)."""
        embeddings = self.encode_text(list(prompts) + list(negatives or [])).to(self.dtype)
        if negatives is None:
            return embeddings, None
        return embeddings[:len(prompts)], embeddings[len(prompts):]

    @torch.no_grad()
    def encode_text(self, prompts) -> torch.Tensor:
        """Prompts -> penultimate-layer embeddings (b, 77, width); long prompts are truncated."""
        n = self.config.text.context_length
        for prompt in prompts:
            count = tokenizer.count_tokens(prompt)
            if count > n:   # the prompt's start names it: a log line per request, not a copy of the prompt
                shown = repr(prompt) if len(prompt) <= 80 else f'{prompt[:60]!r}... ({len(prompt)} characters)'
                logger.warning('prompt of %d tokens truncated to the text encoder\'s %d: %s', count, n, shown)
        tokens = tokenizer.tokenize(list(prompts), context_length=n).to(self.device)
        with self.on_device(self.text_encoder) as text_encoder:
            return text_encoder(tokens).clone()   # compiled with CUDA graphs, the output is the graph's, reused

    @contextlib.contextmanager
    def on_device(self, module: torch.nn.Module):
        """`module` on the compute device inside the block; with low_memory, back on the CPU after it."""
        if not self.low_memory or next(module.parameters()).device.type != 'cpu':
            yield module  # resident: always without low_memory, or inside an enclosing block
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to('cpu')

    def decode_chunk_frames(self, request: GenerationRequest) -> Optional[int]:
        """Frames the autoencoder encodes (a starting video's) or decodes at once for `request`: its own choice,
        else per device (None: all): the encoder's full-size activations of every frame in a pass otherwise."""
        if request.decode_chunk_frames is not None or self.device.type != 'cuda':
            return request.decode_chunk_frames
        return LOW_MEMORY_DECODE_CHUNK_FRAMES if self.low_memory else CUDA_DECODE_CHUNK_FRAMES

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_frames: Optional[int] = None) -> torch.Tensor:
        """Latents (n, c, f, h/8, w/8) -> video (n, 3, f, h, w) in [-1, 1], `chunk_frames` frames at a time."""
        if chunk_frames is None and self.device.type == 'cuda':
            chunk_frames = LOW_MEMORY_DECODE_CHUNK_FRAMES if self.low_memory else CUDA_DECODE_CHUNK_FRAMES
        with self.on_device(self.autoencoder) as autoencoder:
            return autoencoder.decode_video(latents, chunk_frames)

    @contextlib.contextmanager
    def generating(self):
        """Hold the engine for one generation, from its text to its frames; a call from another thread waits.

        The networks carry per-generation state: the UNet keeps the running generation's text keys and values
        (UNet3D.remember_text: projected once, in static buffers that the CUDA graphs of compile_networks
        read), and with low_memory the text encoder and autoencoder move between devices. Serialising
        keeps that fast path unchanged; generations in parallel take one engine each.
        """
        if self._generating_thread == threading.get_ident():
            raise RuntimeError('a callback cannot start a generation on the same engine: it would wait for the '
                               'generation that called it; use another TextToVideo for nested generations')
        with self._lock:
            self._generating_thread = threading.get_ident()
            try:
                yield
            finally:
                self._generating_thread = None

    def guided_unet(self, context: torch.Tensor, uncond: Optional[torch.Tensor], scale: float):
        """eps(x, t, None) of the UNet guided by these texts (uncond None: guidance off). Their keys and
        values are projected once here, not at every step (UNet3D.remember_text). A UNet with a guidance
        embedding (a T2V-Turbo LoRA brings one) gets `scale` as w, one per video, at every call: T2V-Turbo's
        pipeline passes its guidance_scale itself (diffusers' LCM pipelines pass guidance_scale - 1)."""
        self.unet.remember_text(context if uncond is None else torch.cat([uncond, context]))
        if self.unet.time_cond_proj is None:
            unet = self.unet
        else:
            w = torch.full((context.shape[0],), float(scale), device=self.device)

            def unet(x, t, context):
                return self.unet(x, t, context, guidance=w[:x.shape[0]])

        if uncond is None:   # few-step samplers: no second text, scale or not
            # the eps is then the UNet's output itself: a CUDA graph's where the UNet is replayed (compiled, or
            # cuda_graphs), which the next step overwrites; a scheduler that keeps it (PNDM's ets) needs a copy
            return lambda x, t, context: unet(x, t, context).clone()
        return guided(unet, scale)

    # -- LoRAs (lora/): changed under the generation lock, so never during a generation --------------

    def load_lora(self, path: str, scale: float = 1.0, name: Optional[str] = None) -> str:
        """Apply the LoRA at `path` (a file, folder or hub id; any format of lora/formats.py) to the weights at
        `scale`, on top of those loaded; returns its name (default: `path` as given)."""
        name = os.fspath(path) if name is None else name
        weights = self.read_lora(path)
        with self.generating():
            self.loras.load(weights, scale, name)
        return name

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Take the LoRA `name` off the weights, or every LoRA not fused (None); the base weights come back
        bit for bit."""
        with self.generating():
            self.loras.unload(name)

    def fuse_lora(self) -> None:
        """Make the loaded LoRAs permanent (diffusers' fuse_lora): unload_lora no longer takes them off."""
        with self.generating():
            self.loras.fuse()

    def unfuse_lora(self) -> None:
        """Take the fused LoRAs off the weights (diffusers' unfuse_lora): the base bit for bit, when no other
        LoRA is loaded."""
        with self.generating():
            self.loras.unfuse()

    def read_lora(self, path: str) -> LoraWeights:
        """The LoRA at `path` (a hub id is downloaded once), checked against this model's configuration."""
        from .hub import resolve_lora
        return read_lora(resolve_lora(path), self.config)

    @contextlib.contextmanager
    def request_loras(self, request: GenerationRequest, weights: List[LoraWeights]):
        """The request's LoRAs on the weights inside the block (the caller holds the lock), off after it."""
        names = []
        try:
            for i, (lora, scale) in enumerate(zip(request.lora, request.lora_scale)):
                name = f'{REQUEST_LORA}{i}: {lora}'
                self.loras.load(weights[i], scale, name)
                names.append(name)
            yield
        finally:
            for name in names:
                self.loras.unload(name)

    def initial_noise(self, request: GenerationRequest) -> tuple:
        """Unit Gaussian latents (n, c, f, h/8, w/8), drawn on the CPU as the original does, and the seed
        each video can be made again with (None where there is none).

        With a seed, video i is `torch.randn` after `torch.manual_seed(seed + i)`:
        the same noise on every device and in the original implementation. With no
        seed, generator or latents, each video is one `torch.randn` from torch's
        global generator, as one call of ModelScope's built-in pipeline draws it; the
        first video's seed is known where that generator was freshly seeded and the
        sampler adds no noise of its own (then seed= makes the video again).
        """
        if request.latents is not None:
            return request.latents.to(torch.float32), request.seeds()
        cell = self.config.autoencoder.downsample
        n, c, f = request.num_videos, self.config.unet.in_dim, request.num_frames
        h, w = request.height // cell, request.width // cell
        g = request.generator
        if g is not None:
            if request.init_video is not None:   # frame-major, as diffusers' VideoToVideoSDPipeline draws it
                noise = rearrange(torch.randn((n * f, c, h, w), generator=g, device=g.device),
                                  '(n f) c h w -> n c f h w', n=n)
            else:
                noise = torch.randn((n, c, f, h, w), generator=g, device=g.device)
            return rescheduled(noise.cpu(), request, g), request.seeds()
        if request.seed is None:
            first = None if draws_step_noise(request.sampler, request.eta) else global_seed_if_fresh()
            seeds = [first] + [None] * (n - 1)
            return rescheduled(torch.cat([torch.randn(1, c, f, h, w) for _ in seeds]), request, None), seeds
        videos = []
        for seed in request.seeds():
            g = torch.Generator().manual_seed(seed)
            videos.append(rescheduled(torch.randn(1, c, f, h, w, generator=g), request, g))
        return torch.cat(videos), request.seeds()

    @torch.no_grad()
    def encode_start(self, request: GenerationRequest) -> Optional[torch.Tensor]:
        """Scaled latents of the starting frames: init_video's (n, c, f, h/8, w/8) or init_image's
        (n, c, 1, h/8, w/8), on the device; None without either. Frames are resized to the request's size
        (torch's antialiased bicubic) and trimmed or looped to num_frames."""
        start = request.init_video if request.init_video is not None else request.init_image
        if start is None:
            return None
        n = request.num_videos
        if isinstance(start, torch.Tensor):   # latents already
            return start.to(self.device, self.dtype).expand(n, -1, -1, -1, -1)
        frames = start[None] if request.init_video is None else np.resize(
            start, (request.num_frames,) + start.shape[1:])   # np.resize repeats the frames in order
        pixels = torch.tensor(frames, device=self.device)   # a copy: the frames may be a read-only view
        pixels = rearrange(pixels, 'f h w c -> f c h w').to(torch.float32) / 255 * 2 - 1
        if pixels.shape[-2:] != (request.height, request.width):
            pixels = F.interpolate(pixels, size=(request.height, request.width), mode='bicubic',
                                   antialias=True).clamp(-1, 1)
        pixels = rearrange(pixels, 'f c h w -> 1 c f h w').to(self.dtype)
        with self.on_device(self.autoencoder) as autoencoder:
            latents = autoencoder.encode_video(pixels, request.generator, self.decode_chunk_frames(request))
        return latents.expand(n, -1, -1, -1, -1)

    @torch.no_grad()
    def __call__(self, request: GenerationRequest) -> GenerationResult:
        """Generate the videos of a checked request; safe from several threads (steps 2-5 hold
        generating(), so calls run one at a time; writing the files does not hold it)."""
        # 1. inputs were checked by parse_request, the memory they need here; one row per video from here on
        check_memory(self.config, request, self.device, self.dtype, self.decode_chunk_frames(request))
        per_video = request.num_videos_per_prompt
        prompts = [p for p in request.prompts for _ in range(per_video)]
        negatives = [p for p in request.negative_prompts for _ in range(per_video)]
        lora_weights = [self.read_lora(path) for path in request.lora]   # read and checked before the lock
        with self.generating(), self.request_loras(request, lora_weights):
            # 2. encode text (the unconditional branch only when guidance is on: not with few-step samplers)
            guidance_on = uses_guidance(request.sampler, request.guidance_scale)
            context, uncond = self.encode_prompts(prompts, negatives if guidance_on else None)

            # 3. prepare the start: the encoded starting frames (first: a generator's draws come in diffusers'
            #    order), and noise on the CPU from the seeds (or torch's global generator), then moved
            start = self.encode_start(request)
            noise, seeds = self.initial_noise(request)
            noise = noise.to(self.device, self.dtype)

            # 4. denoise; stochastic samplers (eta > 0, ancestral, SDE) draw their noise from the seed too
            scheduler = make_scheduler(request.sampler, self.config.diffusion, request.num_inference_steps)
            model_fn = self.guided_unet(context, uncond, request.guidance_scale)
            self.unet.set_temporal_window(request.temporal_window, request.temporal_stride or 1)
            sums = []   # (timestep, float32 sum of the latents) after each step
            from_video = request.init_video is not None
            latents = denoise(model_fn, noise, None, scheduler, request.num_inference_steps,
                              eta=request.eta, generator=step_noise_generator(request, self.device),
                              callback=_watched_steps(request.callback, sums), progress=_progress(request),
                              init=start if from_video else None, strength=request.strength,
                              held=None if from_video else start)
            parameters = [self.parameters(request, seeds[i], prompts[i], negatives[i])
                          for i in range(request.num_videos)]
            if request.output_type == 'latents':
                check_finite_steps(sums, request)
                return GenerationResult(parameters=parameters, latents=latents.float().cpu())

            # 5. decode to uint8 frames (n, f, h, w, 3); the steps are checked once the decode is queued, so the
            #    device goes on from the last step to the decode without waiting for the host
            video = self.decode(latents, request.decode_chunk_frames)
            check_finite_steps(sums, request)
            if not torch.isfinite(video).all():
                raise NonFiniteError(f'the autoencoder decoded NaN or inf from finite latents ({self.dtype} '
                                     'overflow?); no file was written')
            frames = list(to_uint8_frames(video))
            if self.compile_cache is not None:   # the artefacts whose builds this video started are ready
                self.compile_cache.wait()
        if request.output_type == 'frames':
            return GenerationResult(parameters=parameters, frames=frames)

        # 6. write one file per video
        paths = output_paths(request.output_video, request.num_videos)
        for path, clip, params in zip(paths, frames, parameters):
            write_generated_video(clip, path, params)
            params['output_video'] = path
        return GenerationResult(parameters=parameters, paths=paths, frames=frames)

    def parameters(self, request: GenerationRequest, seed: Optional[int], prompt: str, negative: str) -> dict:
        """The parameters of one video, enough to make it again."""
        sampler = request.sampler if isinstance(request.sampler, str) else type(request.sampler).__name__
        loaded = {name: scale for name, scale in self.loras.active().items() if not name.startswith(REQUEST_LORA)}
        return {
            'text': prompt, 'negative_prompt': negative, 'seed': seed,
            'sampler': sampler, 'num_inference_steps': request.num_inference_steps,
            'guidance_scale': request.guidance_scale, 'eta': request.eta,
            'height': request.height, 'width': request.width, 'num_frames': request.num_frames,
            'fps': request.fps, 'model_dir': self.model_dir,
            **({'start': 'video', 'strength': request.strength} if request.init_video is not None else {}),
            **({'start': 'image'} if request.init_image is not None else {}),
            **({'temporal_window': request.temporal_window, 'temporal_stride': request.temporal_stride}
               if request.temporal_window is not None else {}),
            **({'lora': list(request.lora), 'lora_scale': list(request.lora_scale)} if request.lora else {}),
            **({'loaded_lora': loaded} if loaded else {}),   # load_lora's: name -> scale
        }


def activation_bytes(config: config_lib.ModelConfig, request: GenerationRequest, dtype: torch.dtype,
                     chunk_frames: Optional[int]) -> int:
    """A lower bound of the memory a generation needs besides the weights: what must be held at once.

    Derived from the networks' forward passes (b = bytes per element of dtype, A = (h/8)(w/8) latent cells):
    - the UNet, once per step for all texts: rows = texts x videos x frames. Its forward keeps every input
      block's output until the output block that reads it (UNet3D.forward's skips): the sum over those
      blocks of width x cells, 1620 x A for the real model (320 x A three times at full size, then
      320/4 + 1280/4 + 640/16 + 2560/16 + 1280/64 + 2560/64). While they are held, the first spatial
      transformer's GEGLU projects each cell to 2 x 4 x width = 8 x 320 channels (where that level has
      attention). So: rows x A x b x (skip channels + 8 x dim).
    - the decoder, per chunk of c frames of H x W pixels: at full size its first ResnetBlock holds its
      input (the upsampled width w1 of the level below, 256 for the real model), that input normalised and
      passed through SiLU (w1) and the conv's output (w0 = 128): c x H x W x b x (2 w1 + w0). The decoded
      frames, (n f) x 3 x H x W x b, are held beside it.
    - the latents: each text's noise prediction, rows x 4 x A x b, beside the float32 starting noise.
    Caches, workspaces, attention and the weights come on top. For the real model at 256x256, 16 frames in
    float16 this gives 0.26 GiB for the UNet and 0.31 GiB for a decode in chunks of 4 frames (1.25 GiB for
    all 16 at once), where docs/decisions.md measures 0.53 and 1.46 GiB for the compiled decoder alone, and
    docs/benchmarks.md 4.03 GiB for a whole eager generation over 3.45 GiB of weights.
    """
    unet, autoencoder = config.unet, config.autoencoder
    b = torch.finfo(dtype).bits // 8
    cells = (request.height // autoencoder.downsample) * (request.width // autoencoder.downsample)
    videos_frames = request.num_videos * request.num_frames
    rows = (2 if uses_guidance(request.sampler, request.guidance_scale) else 1) * videos_frames
    # skip channels in units of the full-size cells, level by level as UNet3D builds its input blocks
    skips, area, width = unet.dim, 1.0, unet.dim
    for level, mult in enumerate(unet.dim_mult):
        width = unet.dim * mult
        skips += unet.res_blocks * width * area
        if level != len(unet.dim_mult) - 1:
            area /= 4
            skips += width * area
    geglu = 8 * unet.dim if 1.0 in unet.attn_scales else 0
    denoise = rows * cells * b * (skips + geglu)
    widths = [autoencoder.ch * m for m in autoencoder.ch_mult]
    pixels = request.height * request.width
    chunk = min(chunk_frames or videos_frames, videos_frames)
    decode = chunk * pixels * b * (2 * widths[min(1, len(widths) - 1)] + widths[0]) + videos_frames * 3 * pixels * b
    latents = rows * unet.in_dim * cells * b + videos_frames * unet.in_dim * cells * 4
    return int(max(denoise, decode) + latents)


def device_memory_bytes(device: torch.device) -> int:
    """What a generation can use on `device`: on CUDA the free memory plus what torch's allocator holds
    unused; on the CPU the machine's physical memory (a request over it cannot finish without swapping)."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_memory(config: config_lib.ModelConfig, request: GenerationRequest, device: torch.device,
                 dtype: torch.dtype, chunk_frames: Optional[int]) -> None:
    """ValueError with the figures when the request needs more memory than the device has (activation_bytes),
    before any model work: else the allocator fails minutes in, or the machine swaps."""
    need, have = activation_bytes(config, request, dtype, chunk_frames), device_memory_bytes(device)
    if need > have:
        raise ValueError(
            f'{request.num_videos} video(s) of {request.num_frames} frames of {request.width}x{request.height} '
            f'need at least {need / 2 ** 30:.1f} GiB of {device.type} memory besides the weights; this {device.type} '
            f'has {have / 2 ** 30:.1f} GiB. Ask for fewer frames or videos or a smaller size, or (for the decoder) '
            'a smaller decode_chunk_frames')


def global_seed_if_fresh() -> Optional[int]:
    """torch.initial_seed() while the global CPU generator is still where that seed put it (a draw from it
    then equals a draw after torch.manual_seed(that seed), so the seed makes the video again), else None."""
    seed = torch.initial_seed()
    fresh = torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(seed).get_state())
    return seed if fresh else None


def rescheduled(noise: torch.Tensor, request: GenerationRequest, generator) -> torch.Tensor:
    """`noise` (n c f h w), FreeNoise-rescheduled (sampling.reschedule_noise) where the request has
    temporal windows; the shuffles come from `generator` (torch's global one when None)."""
    if request.temporal_window is None:
        return noise
    return reschedule_noise(noise, request.temporal_window, request.temporal_stride, generator)


def step_noise_generator(request: GenerationRequest, device: torch.device) -> Optional[torch.Generator]:
    """Where stochastic samplers draw their step noise: the request's generator; a generator on `device`
    seeded with the request's seed (noise drawn where the latents are: a CPU generator's draws would be
    copied to the GPU from pageable memory, which waits for the GPU at every step); or (None) the global
    generator of the latents' device, as the built-in's sampler does."""
    if request.generator is not None:
        return request.generator
    return None if request.seed is None else torch.Generator(device).manual_seed(request.seed)


def compile_mode(compile) -> Optional[str]:
    """The torch.compile mode that from_pretrained's `compile` asks for, None for no compiling."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return 'default'
    if compile not in COMPILE_MODES:
        raise ValueError(f'compile={compile!r} is not a torch.compile mode: '
                         f'choose False, True or one of {COMPILE_MODES}')
    return compile


def check_compile_options(compile, compile_cache, cuda_graphs) -> None:
    """from_pretrained's compile (compile_mode), compile_cache and cuda_graphs, which goes without compile."""
    compile_mode(compile)
    check_compile_cache(compile_cache)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f'cuda_graphs={cuda_graphs!r} is not True or False')
    if cuda_graphs and compile_mode(compile):
        raise ValueError(f"cuda_graphs=True replays the uncompiled networks: pass it without compile (given "
                         f"compile={compile!r}); compile='reduce-overhead' gives compiled networks CUDA graphs")


def open_compile_cache(compile_cache: bool | str, engine: Optional[tuple] = None) -> CompileCache:
    """The CompileCache that compile_cache (True or a folder) names; given the `engine` it will serve (its model
    config, dtype, device, compile mode and low_memory: compile_cache.preload_key's arguments), it starts loading
    what an earlier engine of those used."""
    use_torchs_ptxas()   # before any kernel loads
    folder = None if compile_cache is True else os.fspath(compile_cache)
    if engine is None:
        return CompileCache(folder)
    return CompileCache(folder, key=preload_key(*engine), device=engine[2])


def check_compile_cache(compile_cache) -> None:
    """from_pretrained's compile_cache: False, True or a folder's path (or an open CompileCache), where this torch
    has inductor's standalone_compile."""
    if isinstance(compile_cache, CompileCache):
        return
    if not isinstance(compile_cache, (bool, str, os.PathLike)):
        raise TypeError(f'compile_cache={compile_cache!r} is not True, False or a folder\'s path')
    if isinstance(compile_cache, (str, os.PathLike)) and os.path.exists(compile_cache) \
            and not os.path.isdir(compile_cache):
        raise ValueError(f'compile_cache={os.fspath(compile_cache)!r} is a file, not a folder')
    if compile_cache is not False and not hasattr(importlib.import_module('torch._inductor'), 'standalone_compile'):
        raise ValueError(f"compile_cache={compile_cache!r} needs inductor's standalone_compile, new in torch 2.8; "
                         f'this torch is {torch.__version__}: compile without compile_cache, or upgrade torch')


def compile_options(mode: str) -> dict:
    """The inductor options of torch.compile's `mode`, in inductor's deterministic mode: its kernels' variants
    are chosen when they are built, not timed in each process, so every process makes the same frames from the
    same seed (on an H100 a default video took 1.6 % longer, and a warm process's first video 1 s less).
    Without programmatic dependent launch, whose kernels inductor's static launcher cannot load: on an H100 it
    saved 3.6 ms a default video and cost a warm compile-cache start 1.2 s (docs/decisions.md)."""
    import torch._inductor
    options = dict(torch._inductor.list_mode_options(mode))
    if hasattr(torch._inductor.config, 'deterministic'):   # torch 2.11 has it
        options['deterministic'] = True
    return options


def use_torchs_ptxas(torch_folder: str = os.path.dirname(torch.__file__)) -> None:
    """Point Triton at the ptxas torch ships (TRITON_PTXAS_PATH), where there is one and none is set, before any
    kernel compiles. Inductor does so when it first compiles or loads a kernel, and the ptxas is part of
    Triton's cache key: our Triton kernels, first compiled before that in a cold process, would compile again
    in every later one (2.9 s of a warm start on an H100, docs/decisions.md)."""
    ptxas = os.path.join(torch_folder, 'bin', 'ptxas')
    if 'TRITON_PTXAS_PATH' not in os.environ and os.access(ptxas, os.X_OK):
        os.environ['TRITON_PTXAS_PATH'] = ptxas


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Decoder output (n, 3, f, h, w) in [-1, 1] -> uint8 (n, f, h, w, 3), truncated as the original.

    The arithmetic runs where the video is (float32, one operation at a time,
    as numpy would), so only the uint8 frames travel to the host.
    """
    video = ((video.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return rearrange(video, 'n c f h w -> n f h w c').cpu().numpy()


def write_generated_video(frames: np.ndarray, path: str, parameters: dict) -> None:
    """One generated video's file: uint8 frames (f, h, w, 3) at its fps, its parameters as JSON in the comment."""
    video_io.write_video(frames, path, fps=parameters['fps'], metadata={'comment': json.dumps(parameters)})


def output_paths(output_video, n: int) -> List[str]:
    """Where the n videos go: the given path (name-i.ext for a batch) or new temporary files."""
    if output_video is None:
        return [video_io.temporary_video_path('.mp4') for _ in range(n)]
    return numbered_paths(output_video, n)


def _watched_steps(callback, sums: list):
    """denoise's callback: the request's callback (False cancels), then a float32 sum of the latents, appended
    to `sums` with the timestep. The sum stays on the device, queued without waiting for the step; NaN or inf
    anywhere in the latents, the caller's writes included, makes it non-finite."""
    def call(step, timestep, latents):
        if callback is not None and callback(step, timestep, latents) is False:
            raise GenerationCancelled(f'generation cancelled by the callback at step {step}')
        sums.append((timestep, latents.sum(dtype=torch.float32)))

    return call


def check_finite_steps(sums: list, request: GenerationRequest) -> None:
    """Raise NonFiniteError naming the first step whose latents hold NaN or inf (they would decode to a black
    video); one wait for the device, after the last step."""
    finite = torch.isfinite(torch.stack([total for _, total in sums])).tolist()
    if all(finite):
        return
    step = finite.index(False)
    sampler = request.sampler if isinstance(request.sampler, str) else type(request.sampler).__name__
    raise NonFiniteError(f'the latents became NaN or inf at step {step + 1} of {len(sums)} (timestep '
                         f'{sums[step][0]}) with sampler={sampler!r}, guidance_scale={request.guidance_scale}; '
                         'no file was written. A scheduler instance or a callback that writes non-finite values '
                         'does this, as do weights that overflow float16')


def _progress(request: GenerationRequest):
    show = request.show_progress if request.show_progress is not None else sys.stderr.isatty()
    if not show:
        return iter
    from tqdm.auto import tqdm
    return lambda steps: tqdm(steps, desc='denoising', unit='step')
