"""The driver's sample of a text column: token counts from the first row group of a few files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.shards import InputFile, cut_shards, list_input, read_footers
from jobs.text_profiles import SAMPLE_FILES, sample_lengths
from tests.workers.test_preprocess import resolved_text, text_model, tokenizer_json  # noqa: F401
from workers.text import TextEncoder


def test_lengths_come_from_the_first_row_group_of_the_first_files(tokenizer_json: str,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    texts = [("word " * (i % 7)).strip() or None for i in range(12)]
    for k in range(SAMPLE_FILES + 1):
        pq.write_table(pa.table({"review": texts, "n": list(range(12))}),
                       tmp_path / f"part-{k}.parquet", row_group_size=5)
    fs, listing = list_input(str(tmp_path))
    files = [f for f in read_footers(fs, listing) if isinstance(f, InputFile)]
    spec = resolved_text(tokenizer_json, text_model(), max_length=16)
    lengths = sample_lengths(cut_shards(files, 12), spec, {})
    encoder = TextEncoder(spec.tokenizer_json, "t", 16, spec.truncation)
    one = encoder.encode_ragged([t or "" for t in texts[:5]]).lengths
    assert lengths.tolist() == one.tolist() * SAMPLE_FILES  # nulls count as empty text
