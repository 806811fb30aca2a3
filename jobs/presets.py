"""Presets: `jobs.score`, `jobs.enrich` and `jobs.relabel` are `jobs.run` with defaults for one use.

A preset's defaults sit under the config file and the flags: anything either sets wins. Every
flag of `jobs.run` works with every preset.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.spec import build_parser


@dataclass(frozen=True)
class Preset:
    """One entrypoint: its name, what it is for, its default settings and a worked example."""

    name: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    example: str = ""

    def parser(self) -> argparse.ArgumentParser:
        p = build_parser(prog=f"python -m jobs.{self.name}", description=self.description)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = f"example:\n{self.example}" if self.example else None
        # Read by jobs.spec.spec_from_args, under the config's and the flags' settings.
        p.set_defaults(preset=dict(self.defaults))
        return p

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run the job the flags describe; returns the exit code."""
        from jobs.cli import main

        return main(argv, self.parser())


SCORE = Preset(
    name="score",
    description=(
        "Offline scoring of a table: numeric feature columns (any int or float types) stacked "
        "into the model's [N, F] input with --features, outputs as columns, or as labels and "
        "scores with --postprocess argmax/topk/sigmoid and --labels."),
    defaults={"postprocess": ["raw"]},
    example=(
        "  python -m examples.patients demo-data/tabular\n"
        "  python -m jobs.score --model demo-data/tabular/classifier.onnx \\\n"
        "    --input demo-data/tabular/patients --output demo-data/out/scores \\\n"
        "    --features 'mean_*,*_error,worst_*' --keep patient_id --keep diagnosis \\\n"
        "    --postprocess argmax --labels demo-data/tabular/labels.txt"),
)

ENRICH = Preset(
    name="enrich",
    description=(
        "Enrich a text table: --text-column tokenized with --tokenizer (a Hugging Face "
        "tokenizer.json) into the model's input_ids/attention_mask/token_type_ids, and the "
        "output pooled into one L2-normalized embedding per row (--pooling mean, the default; "
        "cls; or none for a pooled output). --postprocess argmax/topk/sigmoid for classifiers."),
    defaults={"preprocess": [{"kind": "text"}],
              "postprocess": [{"kind": "embedding", "pooling": "mean"}]},
    example=(
        "  python -m examples.reviews demo-data/text\n"
        "  python -m jobs.enrich --model demo-data/text/encoder.onnx \\\n"
        "    --input demo-data/text/reviews --output demo-data/out/embeddings \\\n"
        "    --text-column review --tokenizer demo-data/text/tokenizer.json \\\n"
        "    --max-length 128 --keep review_id"),
)

RELABEL = Preset(
    name="relabel",
    description=(
        "Relabel images: a directory of image files (one row per file; the output keeps its "
        "path) or a Parquet binary column (--image-column), decoded, resized, center-cropped "
        "and normalized (--mean, --std) to the model's input; the best class and the top k "
        "(--top-k, default 5) with names from --labels. --on-bad-image skip drops a corrupt "
        "image's row (listed in the manifest) instead of failing its shard."),
    defaults={"preprocess": [{"kind": "image", "column": "image"}],
              "postprocess": [{"kind": "argmax"}, {"kind": "topk"}],
              "rows_per_shard": 1000},
    example=(
        "  python -m examples.digits demo-data/digits\n"
        "  python -m jobs.relabel --model demo-data/digits/cnn.onnx \\\n"
        "    --input demo-data/digits/images --output demo-data/out/relabel \\\n"
        "    --labels demo-data/digits/labels.txt --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 \\\n"
        "    --top-k 3 --on-bad-image skip"),
)

PRESETS = {p.name: p for p in (SCORE, ENRICH, RELABEL)}
