"""Special tokens are paired by role across families, and role partners fill ``*_first``."""

from __future__ import annotations

import pytest

from conftest import tokenizer_path


def _names(view, ids):
    return [view.hf.convert_ids_to_tokens(int(i)) for i in ids]


def test_chat_markers_pair_by_role(qwen, llama):
    from xtok_kd.vocab.specials import special_pairs

    t, s, roles = special_pairs(qwen, llama)
    pairs = dict(zip(_names(qwen, t), _names(llama, s)))
    assert pairs["<|im_start|>"] == "<|start_header_id|>"
    assert pairs["<|im_end|>"] == "<|eot_id|>"
    assert pairs["<|endoftext|>"] == "<|end_of_text|>"
    assert "turn_start" in roles and "turn_end" in roles


def test_bos_eos_pair_across_families(llama, mistral):
    from xtok_kd.vocab.specials import special_pairs

    t, s, roles = special_pairs(llama, mistral)
    pairs = list(zip(_names(llama, t), _names(mistral, s)))
    assert ("<|begin_of_text|>", "<s>") in pairs
    assert ("<|end_of_text|>", "</s>") in pairs
    assert len(roles) == len(pairs)


def test_role_partner_is_first_and_unmatched_special_is_unmapped():
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment

    llama = load_tokenizer(tokenizer_path("llama3.2"))
    gpt2 = load_tokenizer(tokenizer_path("gpt2"))
    table = VocabAlignment.build(llama, gpt2, neighbours=0, progress=False)
    eos = gpt2.hf.convert_tokens_to_ids("<|endoftext|>")
    assert int(table.t2s_first[llama.hf.convert_tokens_to_ids("<|end_of_text|>")]) == eos
    assert table.decomposition("teacher_to_student", llama.hf.convert_tokens_to_ids("<|end_of_text|>")) == [eos]
    reserved = llama.hf.convert_tokens_to_ids("<|reserved_special_token_5|>")
    assert int(table.t2s_first[reserved]) == -1 and float(table.t2s_weight[reserved]) == 0.0
    assert table.decomposition("teacher_to_student", reserved) == []
    assert int(table.s2t_first[eos]) == llama.hf.convert_tokens_to_ids("<|end_of_text|>")
    with pytest.raises(ValueError, match="teacher_to_student"):
        table.projection("t2s")
