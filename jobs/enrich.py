"""`python -m jobs.enrich`: embed (or classify) a text column with an ONNX model."""

from __future__ import annotations

from jobs.cli import exit_program
from jobs.presets import ENRICH

if __name__ == "__main__":
    exit_program(ENRICH.main())
