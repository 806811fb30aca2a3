"""`python -m jobs.relabel`: label a directory (or column) of images with an ONNX model."""

from __future__ import annotations

import sys

from jobs.presets import RELABEL

if __name__ == "__main__":
    sys.exit(RELABEL.main())
