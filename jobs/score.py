"""`python -m jobs.score`: score a table's feature columns with an ONNX model."""

from __future__ import annotations

from jobs.cli import exit_program
from jobs.presets import SCORE

if __name__ == "__main__":
    exit_program(SCORE.main())
