"""The runnable example trains for a few steps end to end (embedded tokenizers, tiny random models)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_minimal.py"


def test_distill_minimal_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("distill_minimal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(["--steps", "3", "--max-length", "64"])
    assert metrics["step"] == 2
    assert math.isfinite(metrics["ce"]) and math.isfinite(metrics["kd"]) and metrics["kd"] >= 0
    assert metrics["chunks"] > 0 and 0 < metrics["aligned_share"] <= 1
    assert list(tmp_path.glob("*.safetensors")), "the vocabulary table was not cached where XTOK_KD_CACHE points"
