"""The README's embedded default: train, relabel on local Ray, report accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.demo import main

pytestmark = pytest.mark.ray


def test_demo_relabels_digits(ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                              ) -> None:
    assert main(["--workdir", str(tmp_path), "--backend", "onnxruntime"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 1797 and result["test_rows"] == 719
    # The runner's labels are the trained model's own: same accuracy as scikit-learn's predict.
    assert result["accuracy_on_test_split"] == result["sklearn_accuracy_on_test_split"]
    assert result["accuracy_on_test_split"] > 0.9
    assert (tmp_path / "relabeled" / "_SUCCESS").exists()
