"""CLIP's byte-pair tokenizer, taken from open_clip (its BPE vocabulary is the reference).

Text is cleaned with ftfy and regex (HTML unescaping, whitespace folding), lower-cased, wrapped
in start/end-of-text tokens and padded or truncated to the context length. When truncated, the
last position keeps the end-of-text token, so the text tower still finds it (the highest id).
"""
from __future__ import annotations

SOT_TOKEN = 49406
EOT_TOKEN = 49407


def get_tokenizer(context_length: int = 77):
    """A callable ``tokenizer(list_of_str) -> LongTensor (N, context_length)`` (open_clip's
    ``SimpleTokenizer``; imported here because open_clip takes seconds to import)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)
