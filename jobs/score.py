"""`python -m jobs.score`: score a table's feature columns with an ONNX model."""

from __future__ import annotations

import sys

from jobs.presets import SCORE

if __name__ == "__main__":
    sys.exit(SCORE.main())
