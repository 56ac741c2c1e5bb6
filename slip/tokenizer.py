"""CLIP's byte-pair tokenizer, taken from open_clip (its BPE vocabulary is the reference).

Text is cleaned with ftfy and regex (HTML unescaping, whitespace folding), lower-cased, wrapped
in start/end-of-text tokens and padded or truncated to the context length.

Truncation of a text longer than the context (``truncation``):

* ``keep_eot`` (default, open_clip's and OpenAI CLIP's ``truncate=True``): the last position
  is overwritten with the end-of-text token, so the text tower still finds it (the highest id).
* ``slip``: SLIP's own tokenizer (its copy of CLIP's ``SimpleTokenizer.__call__``) keeps the
  first ``context_length`` tokens of ``[SOT] + BPE + [EOT]`` and so drops EOT. The text tower,
  pooling at the highest id, then pools at the start-of-text token (49406, above every BPE id):
  position 0, which under causal attention sees nothing of the caption. Every caption of 76 or
  more BPE tokens gets the same text embedding. Only for reproducing SLIP's numbers.
"""
from __future__ import annotations

import torch

SOT_TOKEN = 49406
EOT_TOKEN = 49407
TRUNCATIONS = ("keep_eot", "slip")


class SlipTruncationTokenizer:
    """open_clip's tokenizer, truncating as SLIP's did: the first ``context_length`` tokens
    of ``[SOT] + BPE + [EOT]``, zero-padded; no EOT when the text is too long."""

    def __init__(self, base, context_length: int = 77):
        self.base, self.context_length = base, context_length

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, tokens) -> str:
        return self.base.decode(tokens)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = ([self.base.sot_token_id] + self.base.encode(text) + [self.base.eot_token_id])[:length]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def trim_padding(tokens: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """A (N, L) token batch cut after its last end-of-text token (the highest id of each row),
    rounded up to a multiple of ``multiple`` (at most L).

    Attention in the text tower is causal, so the pooled features do not depend on the padding
    after EOT: cutting it changes no result and saves most of the 77 positions for short
    captions. Call it where the tokens are made (on the CPU, before moving them to the device):
    finding the cut on a GPU would wait for the GPU. Few distinct lengths keep compiled graphs few.
    """
    if tokens.shape[1] == 0:
        return tokens
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :min(tokens.shape[1], -(-length // multiple) * multiple)]


def get_tokenizer(context_length: int = 77, truncation: str = "keep_eot"):
    """A callable ``tokenizer(list_of_str) -> LongTensor (N, context_length)``: open_clip's
    ``SimpleTokenizer`` (imported here because open_clip takes seconds to import), truncating
    long texts as ``truncation`` says (``keep_eot`` or ``slip``; see the module docstring)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    from open_clip.tokenizer import SimpleTokenizer

    base = SimpleTokenizer(context_length=context_length)
    if truncation == "slip":
        return SlipTruncationTokenizer(base, context_length)
    return base
