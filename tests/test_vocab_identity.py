"""The same tokenizer on both sides yields the identity table."""

from __future__ import annotations

import pytest
import torch

from conftest import tokenizer_path


@pytest.mark.parametrize("name", ["gpt2", "mistral", "qwen2.5"])
def test_same_tokenizer_is_identity(name):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment

    view = load_tokenizer(tokenizer_path(name))
    table = VocabAlignment.identity(view, progress=False)
    ids = torch.arange(view.vocab_size)
    regular = torch.tensor([i for i in range(view.vocab_size) if i not in view.special_ids])
    for d in ("t2s", "s2t"):
        assert torch.equal(getattr(table, f"{d}_first"), ids)
        assert bool((getattr(table, f"{d}_weight") == 1).all())
        assert torch.equal(getattr(table, f"{d}_pieces"), ids)
        assert bool((getattr(table, f"{d}_neighbours") == -1).all())
    # SentencePiece spells b" " twice (``▁`` and ``<0x20>``): those add pairs beyond the diagonal
    diagonal = table.exact_teacher == table.exact_student
    assert torch.equal(table.exact_teacher[diagonal], regular)
    src, dst, w = table.projection("student_to_teacher")
    assert torch.equal(src, dst) and src.shape[0] == view.vocab_size
