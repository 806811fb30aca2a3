"""`python -m jobs.enrich`: embed (or classify) a text column with an ONNX model."""

from __future__ import annotations

import sys

from jobs.presets import ENRICH

if __name__ == "__main__":
    sys.exit(ENRICH.main())
