"""`python -m jobs.run`: run an ONNX model over a Parquet dataset."""

from __future__ import annotations

from jobs.cli import exit_program, main

if __name__ == "__main__":
    exit_program(main())
