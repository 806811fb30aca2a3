"""`python -m jobs.run`: run an ONNX model over a Parquet dataset."""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
