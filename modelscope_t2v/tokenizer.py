"""CLIP BPE tokenization: the one module that imports open_clip.

The ids are those of `open_clip.tokenize`, which ModelScope's text encoder
calls: start token, BPE ids of the lower-cased, whitespace-cleaned prompt, end
token, zero padding to 77; a longer prompt is cut and its last id set to the
end token.
"""

import functools
import importlib.util
import json
import os

import torch

START_TOKEN = 49406   # <start_of_text>
END_TOKEN = 49407     # <end_of_text>


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """open_clip's SimpleTokenizer, built once (it reads the 49k BPE merges)."""
    tok = _open_clip_tokenizer_module().SimpleTokenizer()
    assert (tok.sot_token_id, tok.eot_token_id) == (START_TOKEN, END_TOKEN), \
        (tok.sot_token_id, tok.eot_token_id)
    return tok


def _open_clip_tokenizer_module():
    """open_clip/tokenizer.py run on its own (it imports no other part of open_clip). `import
    open_clip.tokenizer` first runs the package's __init__, which imports its models and torchvision: on the
    project's CPU 0.92 s of every process's first prompt, against 0.16 s."""
    package = importlib.util.find_spec('open_clip')   # found, not imported
    if package is None:
        raise ImportError('open_clip is not installed: pip install open_clip_torch')
    path = os.path.join(os.path.dirname(package.origin), 'tokenizer.py')
    spec = importlib.util.spec_from_file_location('modelscope_t2v._open_clip_tokenizer', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_list(texts) -> list:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f'texts must be a string or a list of strings, got {texts!r}')
    return list(texts)


def tokenize(texts: list[str], context_length: int = 77) -> torch.LongTensor:
    """Prompts -> token ids (b, context_length), identical to open_clip.tokenize."""
    if context_length < 2:
        raise ValueError(f'context_length={context_length} must be at least 2 '
                         '(start and end tokens)')
    return _tokenizer()(_as_list(texts), context_length=context_length)


def count_tokens(text: str) -> int:
    """Tokens of `text` before truncation, start and end tokens included."""
    if not isinstance(text, str):
        raise TypeError(f'text must be a string, got {text!r}')
    return len(_tokenizer().encode(text)) + 2


# transformers' CLIPTokenizer names the start and end tokens as OpenAI's release does
HF_SPECIAL_TOKENS = {'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>',
                     'unk_token': '<|endoftext|>', 'pad_token': '!'}   # '!' is id 0: open_clip's padding


def hf_tokenizer_files(context_length: int = 77) -> dict:
    """File name -> text of a transformers CLIPTokenizer folder that tokenizes as this module does
    (a diffusers folder's tokenizer/): the same BPE vocabulary and merges, zero padding to 77."""
    tok = _tokenizer()
    vocab = {word: i for word, i in tok.encoder.items()}
    vocab[HF_SPECIAL_TOKENS['bos_token']] = vocab.pop('<start_of_text>')
    vocab[HF_SPECIAL_TOKENS['eos_token']] = vocab.pop('<end_of_text>')
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    config = {'tokenizer_class': 'CLIPTokenizer', 'model_max_length': context_length, 'do_lower_case': True,
              'errors': 'replace', **HF_SPECIAL_TOKENS}
    return {
        'vocab.json': json.dumps(vocab, ensure_ascii=False),
        'merges.txt': '#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n',
        'tokenizer_config.json': json.dumps(config, indent=2),
        'special_tokens_map.json': json.dumps(HF_SPECIAL_TOKENS, indent=2),
    }
