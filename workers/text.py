"""Tokenizing text with a Hugging Face `tokenizer.json` (the `tokenizers` library) into token tensors.

Rows are tokenized unpadded and kept ragged (`Ragged`: one flat array per key and the rows'
lengths), so the cost of turning `tokenizers`' Python lists into arrays is per real token, not
per padded one; padding happens once, to whatever width the batch being built needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.errors import MissingDependencyError, SpecError

_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")
#: What `TextEncoder.encode` can return, named as the `tokenizers.Encoding` attributes.
KEYS = ("ids", "attention_mask", "type_ids")
#: The feed that carries each row's token count from the text preprocessor to the batcher
#: (`workers.batching.length_batches`), which removes it before anything reaches the model.
TOKEN_COUNTS = "__tokens__"
#: `model_max_length` values tokenizer configs write when they mean "no limit" (1e30 as int).
_NO_LIMIT = 10**9


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


def tokenizer_limit(tokenizer_json: str, config_json: str | None = None
                    ) -> tuple[int, str] | None:
    """The length a tokenizer is set to cut rows at, and where that comes from; None if unset.

    `tokenizer.json`'s own truncation setting first (what `AutoTokenizer` applies), else
    `model_max_length` of the `tokenizer_config.json` beside it.
    """
    try:
        truncation = json.loads(tokenizer_json).get("truncation")
    except (ValueError, AttributeError):
        truncation = None
    if isinstance(truncation, Mapping) and isinstance(truncation.get("max_length"), int) \
            and truncation["max_length"] > 0:
        return int(truncation["max_length"]), "tokenizer.json truncation max_length"
    if config_json:
        try:
            config = json.loads(config_json)
        except ValueError:
            return None
        value = config.get("model_max_length") if isinstance(config, Mapping) else None
        if isinstance(value, int | float) and 0 < value < _NO_LIMIT:
            return int(value), "tokenizer_config.json model_max_length"
    return None


@dataclass
class Ragged:
    """Unpadded token rows: `flat[key]` holds every row's tokens back to back, `lengths` per row."""

    lengths: np.ndarray
    flat: dict[str, np.ndarray]

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        keys = parts[0].flat if parts else {}
        return cls(np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64),
                   {k: np.concatenate([p.flat[k] for p in parts]) for k in keys})

    def padded(self, width: int, pads: Mapping[str, int], dtype: np.dtype | type = np.int64
               ) -> dict[str, np.ndarray]:
        """Each key as `[rows, width]` with its tokens left-aligned and `pads[key]` after them."""
        real = np.arange(width) < self.lengths[:, None]
        out = {}
        for key, flat in self.flat.items():
            array = np.full((len(self.lengths), width), pads.get(key, 0), dtype)
            array[real] = flat
            out[key] = array
        return out


class TextEncoder:
    """Encodes batches of strings into `ids`, `attention_mask` and `type_ids` arrays `[N, L]`.

    `L` is the batch's longest row (capped at `max_length`), or exactly `length` when the model
    fixes the sequence length. Rows longer than `max_length` are truncated, or raise when
    `truncation` is off. One `encode_batch_fast` call spreads a batch over `tokenizers`' own
    thread pool (Rayon, sized by RAYON_NUM_THREADS), with the GIL released.
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
        # Rows stay unpadded (a tokenizer.json may pad to a fixed length of its own).
        self.tokenizer.no_padding()

    @property
    def pads(self) -> dict[str, int]:
        """The value each key is padded with."""
        return {"ids": self.pad_id, "attention_mask": 0, "type_ids": 0}

    def encode_ragged(self, texts: Sequence[str], column: str = "text", offset: int = 0,
                      keys: Collection[str] = KEYS) -> Ragged:
        """`keys` of every row, unpadded and concatenated, with each row's token count."""
        from workers.errors import DataError

        encodings = self.tokenizer.encode_batch_fast(list(texts))
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        if not self.truncation:
            too_long = np.flatnonzero(lengths > self.max_length)
            if too_long.size:
                i = int(too_long[0])
                raise DataError(f"column '{column}' row {offset + i} has {lengths[i]} tokens, "
                                f"more than max_length {self.max_length}, and truncation is off; "
                                "turn truncation on or raise max_length")
        total = int(lengths.sum())
        flat: dict[str, np.ndarray] = {}
        for key in keys:
            if key == "attention_mask":  # every unpadded token is attended to
                flat[key] = np.ones(total, np.int64)
                continue
            # One Python list per row is the cost here: build only the keys the model takes.
            rows = ids if key == "ids" else [getattr(e, key) for e in encodings]
            flat[key] = np.fromiter(itertools.chain.from_iterable(rows), np.int64, total)
        return Ragged(lengths, flat)

    def width(self, lengths: np.ndarray) -> int:
        """The padded width of rows of these lengths: the longest, or the model's fixed length."""
        if self.length is not None:
            return self.length
        return int(lengths.max()) if lengths.size else 0

    def encode(self, texts: Sequence[str], column: str = "text", offset: int = 0,
               keys: Collection[str] = KEYS) -> dict[str, np.ndarray]:
        """`keys` of `{"ids", "attention_mask", "type_ids"}`, each int64 `[len(texts), L]`."""
        ragged = self.encode_ragged(texts, column, offset, keys)
        return ragged.padded(self.width(ragged.lengths), self.pads)


class TokenizerFile:
    """A tokenizer's JSON in a file of this node, for helper processes (`encode_in_helper`) to
    load once each; a key names the encoder (the JSON's digest and the encoder's settings).
    `close()` removes the file."""

    def __init__(self, tokenizer_json: str, source: str, max_length: int, truncation: bool,
                 length: int | None) -> None:
        digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]
        self.key = f"{digest}:{max_length}:{truncation}:{length}"
        fd, self.path = tempfile.mkstemp(prefix="trt-batch-runner-tokenizer-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
        self.args = (self.key, self.path, source, max_length, truncation, length)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


#: The encoders a helper process has loaded, by `TokenizerFile.key` (the last few kept).
_HELPER_ENCODERS: dict[str, TextEncoder] = {}


def encode_in_helper(key: str, path: str, source: str, max_length: int, truncation: bool,
                     length: int | None, texts: Sequence[str], column: str, offset: int,
                     keys: Collection[str]) -> Ragged:
    """Runs in a helper process (`workers.helpers`): `TextEncoder.encode_ragged` of `texts`
    with the encoder `key` names, loaded from `path` at this process's first use of it."""
    encoder = _HELPER_ENCODERS.get(key)
    if encoder is None:
        # The pool's processes are the parallelism: each tokenizes its own rows on one core.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with open(path, encoding="utf-8") as f:
            encoder = TextEncoder(f.read(), source, max_length, truncation, length)
        while len(_HELPER_ENCODERS) >= 4:
            _HELPER_ENCODERS.pop(next(iter(_HELPER_ENCODERS)))
        _HELPER_ENCODERS[key] = encoder
    return encoder.encode_ragged(texts, column, offset, keys)
