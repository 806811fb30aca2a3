"""Tokenizing text with a Hugging Face `tokenizer.json` (the `tokenizers` library) into token tensors."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from workers.errors import MissingDependencyError, SpecError

_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")
#: What `TextEncoder.encode` can return, named as the `tokenizers.Encoding` attributes.
KEYS = ("ids", "attention_mask", "type_ids")


def import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise MissingDependencyError("the text preprocessor needs the tokenizers package; "
                                     "pip install '.[text]' (or pip install tokenizers)") from exc
    return tokenizers


def load_tokenizer(text: str, source: str) -> Any:
    """A `tokenizers.Tokenizer` from the JSON text of a `tokenizer.json` file."""
    tokenizers = import_tokenizers()
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise SpecError(f"tokenizer {source} cannot be loaded ({exc}); pass a Hugging Face "
                        "tokenizer.json (the file AutoTokenizer.save_pretrained writes)") from exc


def pad_token(tokenizer: Any) -> tuple[int, str]:
    """The tokenizer's padding token: its own padding setting, else a usual pad token, else id 0."""
    padding = tokenizer.padding
    if padding:
        return int(padding["pad_id"]), str(padding["pad_token"])
    for token in _PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id), token
    return 0, "[PAD]"


class TextEncoder:
    """Encodes batches of strings into `ids`, `attention_mask` and `type_ids` arrays `[N, L]`.

    `L` is the batch's longest row (capped at `max_length`), or exactly `length` when the model
    fixes the sequence length. Rows longer than `max_length` are truncated, or raise when
    `truncation` is off.
    """

    def __init__(self, tokenizer_json: str, source: str, max_length: int, truncation: bool = True,
                 length: int | None = None) -> None:
        self.tokenizer = load_tokenizer(tokenizer_json, source)
        self.max_length = max_length
        self.truncation = truncation
        self.length = length
        self.pad_id, self.pad_token = pad_token(self.tokenizer)
        if truncation:
            self.tokenizer.enable_truncation(max_length)
        else:
            self.tokenizer.no_truncation()
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token, pad_type_id=0,
                                      length=length)

    def encode(self, texts: Sequence[str], column: str = "text", offset: int = 0,
               keys: Collection[str] = KEYS) -> dict[str, np.ndarray]:
        """`keys` of `{"ids", "attention_mask", "type_ids"}`, each int64 `[len(texts), L]`."""
        from workers.errors import DataError

        encodings = self.tokenizer.encode_batch_fast(list(texts))
        if not encodings:
            width = self.length or 0
            return {key: np.zeros((0, width), np.int64) for key in keys}
        if not self.truncation:
            too_long = [i for i, e in enumerate(encodings)
                        if sum(e.attention_mask) > self.max_length]
            if too_long:
                i = too_long[0]
                raise DataError(f"column '{column}' row {offset + i} has "
                                f"{sum(encodings[i].attention_mask)} tokens, more than max_length "
                                f"{self.max_length}, and truncation is off; turn truncation on "
                                "or raise max_length")
        # One Python list per row is the cost here; build only the arrays the model takes.
        return {key: np.array([getattr(e, key) for e in encodings], dtype=np.int64)
                for key in keys}
