"""`python -m jobs.relabel`: label a directory (or column) of images with an ONNX model."""

from __future__ import annotations

from jobs.cli import exit_program
from jobs.presets import RELABEL

if __name__ == "__main__":
    exit_program(RELABEL.main())
