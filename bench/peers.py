"""The two implementations users would otherwise run, driven as they run themselves.

builtin    ModelScope's UNetSD / AutoencoderKL / GaussianDiffusion as its model runs
           them (fp32 weights under fp16 autocast, two UNet calls per step);
diffusers  UNet3DConditionModel + AutoencoderKL in fp16 with SDPA, batched guidance.
Both are timed on denoise + decode; the text embedding comes from our encoder.
"""

from __future__ import annotations

import os

import torch
from einops import rearrange

from measure import median_time, peak_gib, timed
from modelscope_t2v import TextToVideo
from modelscope_t2v.schedulers import make_scheduler
from modelscope_t2v.text_to_video import to_uint8_frames

PROMPT = 'A panda eating bamboo on a rock.'
SEED = 42


# -- ModelScope's built-in classes --------------------------------------------------------

def bench_builtin(model_dir: str, engine: TextToVideo, args) -> dict:
    """UNetSD + GaussianDiffusion + AutoencoderKL run as TextToVideoSynthesis runs them."""
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL
    from modelscope.models.multi_modal.video_synthesis.diffusion import GaussianDiffusion, beta_schedule
    from modelscope.models.multi_modal.video_synthesis.unet_sd import UNetSD
    cfg, device = engine.config, engine.device
    u = cfg.unet
    unet = UNetSD(in_dim=u.in_dim, dim=u.dim, y_dim=u.y_dim, context_dim=u.context_dim, out_dim=u.out_dim,
                  dim_mult=list(u.dim_mult), num_heads=u.num_heads, head_dim=u.head_dim,
                  num_res_blocks=u.res_blocks, attn_scales=list(u.attn_scales), dropout=u.dropout,
                  temporal_attention=u.temporal_attention)
    unet.load_state_dict(torch.load(os.path.join(model_dir, cfg.ckpt_unet), weights_only=True), strict=True)
    unet = unet.eval().to(device)
    a = cfg.autoencoder
    ddconfig = dict(double_z=True, z_channels=a.z_channels, resolution=256, in_channels=3, out_ch=3,
                    ch=a.ch, ch_mult=list(a.ch_mult), num_res_blocks=a.res_blocks, attn_resolutions=[],
                    dropout=0.0)
    vae = AutoencoderKL(ddconfig, 4, os.path.join(model_dir, cfg.ckpt_autoencoder)).eval().to(device)
    d = cfg.diffusion
    diffusion = GaussianDiffusion(beta_schedule('linear_sd', d.num_timesteps, init_beta=d.beta_start,
                                                last_beta=d.beta_end),
                                  mean_type='eps', var_type='fixed_small', loss_type='mse')
    with torch.no_grad():
        context = torch.cat([engine.encode_text([PROMPT]), engine.encode_text([''])]).float()
    torch.manual_seed(SEED)
    cell = a.downsample
    noise = torch.randn(1, 4, args.frames, args.height // cell, args.width // cell).to(device)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == 'cuda')

    def generate():
        with torch.no_grad(), autocast:
            x0 = diffusion.ddim_sample_loop(noise=noise, model=unet,
                                            model_kwargs=[{'y': context[:1]}, {'y': context[1:]}],
                                            guide_scale=9.0, ddim_timesteps=50, eta=0.0)
            video = vae.decode(rearrange(x0 / a.scale_factor, 'b c f h w -> (b f) c h w'))
        return rearrange(video, '(b f) c h w -> b c f h w', b=1)

    generate()  # warm-up
    video, _ = timed(generate)
    result = {'label': 'ModelScope built-in (fp16 autocast)', 'end_to_end_s': median_time(generate, args.runs),
              'peak_gib': peak_gib(generate), 'frames': to_uint8_frames(video.float())[0],
              'note': 'denoise + decode; its text encoder fails on open_clip 3.x, so text is not timed'}
    return result


# -- diffusers ---------------------------------------------------------------------------------

def bench_diffusers(engine: TextToVideo, args) -> dict:
    """UNet3DConditionModel + AutoencoderKL of text-to-video-ms-1.7b's config, fp16, SDPA."""
    from diffusers import AutoencoderKL, UNet3DConditionModel
    device = engine.device
    u, a = engine.config.unet, engine.config.autoencoder
    widths = tuple(u.dim * m for m in u.dim_mult)
    unet = UNet3DConditionModel(
        sample_size=args.height // a.downsample, in_channels=u.in_dim, out_channels=u.out_dim,
        down_block_types=('CrossAttnDownBlock3D',) * (len(widths) - 1) + ('DownBlock3D',),
        up_block_types=('UpBlock3D',) + ('CrossAttnUpBlock3D',) * (len(widths) - 1),
        block_out_channels=widths, layers_per_block=u.res_blocks, cross_attention_dim=u.context_dim,
        attention_head_dim=u.head_dim, norm_num_groups=32).to(device, torch.float16).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=a.z_channels, layers_per_block=a.res_blocks,
        block_out_channels=tuple(a.ch * m for m in a.ch_mult),
        down_block_types=('DownEncoderBlock2D',) * len(a.ch_mult),
        up_block_types=('UpDecoderBlock2D',) * len(a.ch_mult)).to(device, torch.float16).eval()
    with torch.no_grad():
        context = torch.cat([engine.encode_text(['']), engine.encode_text([PROMPT])]).half()
    cell = a.downsample
    noise = torch.randn(1, 4, args.frames, args.height // cell, args.width // cell,
                        generator=torch.Generator().manual_seed(SEED)).to(device, torch.float16)

    pixels = None   # a re-render's frames, resized to the output size: (f, 3, h, w) in [-1, 1]
    if args.strength is not None:
        pixels = torch.rand(args.frames, 3, args.height, args.width, generator=torch.Generator().manual_seed(SEED))
        pixels = (pixels * 2 - 1).to(device, torch.float16)

    def generate(sampler: str, steps: int):
        scheduler = make_scheduler(sampler, engine.config.diffusion)
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        with torch.no_grad():
            if pixels is None:
                x = noise * scheduler.init_noise_sigma
            else:   # the start of VideoToVideoSDPipeline: encode, keep the last strength x steps, noise
                init = vae.encode(pixels).latent_dist.mean * a.scale_factor
                init = rearrange(init, '(b f) c h w -> b c f h w', b=1)
                timesteps = timesteps[steps - min(int(steps * args.strength), steps):]
                x = scheduler.add_noise(init, noise, timesteps[:1])
            for t in timesteps:  # the loop of TextToVideoSDPipeline
                x_in = scheduler.scale_model_input(torch.cat([x] * 2), t)
                eps_u, eps_c = unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
                x = scheduler.step(eps_u + 9.0 * (eps_c - eps_u), t, x).prev_sample
            video = vae.decode(rearrange(x / a.scale_factor, 'b c f h w -> (b f) c h w')).sample
        return video

    generate(args.sampler, 2)  # warm-up
    result = {'label': 'diffusers UNet3DConditionModel (fp16, SDPA)',
              'end_to_end_s': median_time(lambda: generate(args.sampler, args.steps), args.runs),
              'peak_gib': peak_gib(lambda: generate(args.sampler, args.steps)),
              'note': 'denoise + decode (+ encode for a re-render) with random weights of the same shapes; text not timed'}
    if args.workload == 'default':
        result['dpm++2m_25_s'] = median_time(lambda: generate('dpm++2m', 25), args.runs)
    return result
