from setuptools import find_packages, setup

# fine-tuning (modelscope_t2v.training): Lightning's Trainer, peft's LoRA layers, YAML configurations
TRAIN = ['pytorch-lightning>=2.1', 'peft>=0.10', 'pyyaml>=5.1']

setup(
    name='modelscope-t2v',
    version='0.1.0',
    description="ModelScope's text-to-video model (UNet3D latent diffusion): exact, fast, "
                'runs on GPU and CPU; a drop-in ModelScope plugin',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['modelscope_t2v', 'modelscope_t2v.*']),
    install_requires=[
        'torch>=2.4',              # torch.library.custom_op (the kernels' ops), mmap loading, assign=True
        'einops>=0.6',
        'numpy',
        'open_clip_torch>=2.20',   # the CLIP BPE tokenizer and its vocabulary
        'modelscope[framework]>=1.9',
        'diffusers>=0.25',         # scheduler classes only
        'imageio-ffmpeg>=0.4.9',   # a bundled ffmpeg: no system install
        'safetensors',
        'xxhash>=3',               # the half-precision cache's integrity hashes (half_cache.py)
        'scipy',                   # the LMS sampler
        'tqdm',
        'huggingface_hub',
    ],
    extras_require={
        # playwright drives Chromium in the demo test; transformers' CLIPTextModel is the parity reference
        # of a diffusers folder's text encoder
        # peft: the reference that PEFT LoRA files load into diffusers' UNet (tests/test_lora.py); reading LoRA files
        # needs no peft. TRAIN (peft among them): tests/test_training.py
        'test': ['pytest>=7', 'playwright>=1.40', 'transformers>=4.30', *TRAIN],
        'demo': ['gradio>=6'],
        'bench': [],
        'train': TRAIN,   # modelscope-t2v train, modelscope_t2v.training
    },
    entry_points={'console_scripts': ['modelscope-t2v=modelscope_t2v.cli:main']},
)
