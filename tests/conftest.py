"""Shared fixtures: real tokenizers from ../shared/tokenizers (or $XTOK_KD_TOKENIZERS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = Path(os.environ.get("XTOK_KD_TOKENIZERS", REPO.parent / "shared" / "tokenizers"))
CORPUS = Path(os.environ.get("XTOK_KD_CORPUS", REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"))


def tokenizer_path(name: str) -> str:
    """Folder of tokenizer ``name`` (qwen2.5, llama3.2, mistral, gpt2); skips the test when it is absent."""
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"tokenizer {name!r} not found at {path}; set XTOK_KD_TOKENIZERS to a folder holding it")
    return str(path)


def corpus_text() -> str:
    if not CORPUS.is_file():
        pytest.skip(f"corpus not found at {CORPUS}; set XTOK_KD_CORPUS")
    return CORPUS.read_text(encoding="utf-8")


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
