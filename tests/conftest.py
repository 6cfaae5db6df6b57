"""Shared fixtures: real tokenizers and a small corpus.

Qwen2.5, Mistral and GPT-2 ship inside the package (``xtok_kd/assets/tokenizers``), so tests that use them always
run. Llama 3.2 may not be copied into the project: tests that need it read ``../shared/tokenizers/llama3.2`` (or the
folder named by ``$XTOK_KD_TOKENIZERS``) and skip, saying so, when it is absent. The corpus is the head of
tinyshakespeare (public domain) committed in ``tests/data``; ``$XTOK_KD_CORPUS`` or ``../shared`` give the whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xtok_kd.assets import embedded_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = Path(os.environ.get("XTOK_KD_TOKENIZERS", REPO.parent / "shared" / "tokenizers"))
CORPUS = Path(os.environ.get("XTOK_KD_CORPUS", REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"))
CORPUS_HEAD = Path(__file__).resolve().parent / "data" / "tinyshakespeare_head.txt"


def tokenizer_path(name: str) -> str:
    """Folder of tokenizer ``name``: the embedded copy for qwen2.5, mistral and gpt2; for others (llama3.2) the
    folder under ``$XTOK_KD_TOKENIZERS`` or ``../shared/tokenizers``, skipping the test when it is absent."""
    embedded = embedded_tokenizer(name)
    if embedded is not None:
        return str(embedded)
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"tokenizer {name!r} not found at {path}; set XTOK_KD_TOKENIZERS to a folder holding it")
    return str(path)


def corpus_text() -> str:
    """The corpus: the full file when present, else the committed head (about 8 kB)."""
    path = CORPUS if CORPUS.is_file() else CORPUS_HEAD
    return path.read_text(encoding="utf-8")


def _view(name: str):
    from xtok_kd.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path(name))


@pytest.fixture(scope="session")
def qwen():
    return _view("qwen2.5")


@pytest.fixture(scope="session")
def llama():
    return _view("llama3.2")


@pytest.fixture(scope="session")
def mistral():
    return _view("mistral")


@pytest.fixture(scope="session")
def gpt2():
    return _view("gpt2")
