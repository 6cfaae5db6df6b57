"""Conformance with TRL's GOLD ``ULDLoss`` (extended alignment, observed merge) on real Qwen2.5 / Llama-3.2 inputs.

Equivalent settings: TRL's "observed" strategy reads the logits at the answer positions themselves (row j for token
j); xtok_kd reads the row that predicts token j (row j - 1). We feed TRL logits shifted by one position, so its row j
is our row j - 1. The first chunk has no predicting row on the teacher side (Qwen adds no BOS) and is left out of
both. TRL averages per sample then over the batch; we reduce ``none`` and do the same. The hybrid's matched set is
TRL's own (raw vocabulary-string equality), passed as ``matched_pairs``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import corpus_text
from xtok_kd.losses import CrossTokenizerKDLoss
from xtok_kd.sequence import align_spans

gold = pytest.importorskip("trl.experimental.gold.gold_trainer", reason="trl (with trl.experimental.gold) not installed")


def texts() -> list[str]:
    corpus = corpus_text()
    return [corpus[:260], corpus[5000:5150] + " In 1623 the Folio sold for £1, i.e. 20 shillings — naïve café 12345."]


def gold_config(hybrid: bool) -> SimpleNamespace:
    return SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True,
        uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=0.5,
    )


def pad(arrays: list[np.ndarray], length: int, value: int) -> torch.Tensor:
    out = np.full((len(arrays), length) + arrays[0].shape[1:], value, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return torch.as_tensor(out)


def shifted(logits: torch.Tensor) -> torch.Tensor:
    """TRL's row j := our row j - 1."""
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], 1)


@pytest.fixture(scope="module")
def inputs(qwen, llama):
    batch = texts()
    t_enc = [qwen.encode(t) for t in batch]
    s_enc = [llama.encode(t) for t in batch]
    alignment = align_spans(t_enc, s_enc)
    lt = max(len(e) for e in t_enc)
    ls = max(len(e) for e in s_enc)
    g = torch.Generator().manual_seed(0)
    vt, vs = qwen.vocab_size, llama.vocab_size
    teacher = torch.randn(len(batch), lt, vt, generator=g) * 3
    student = torch.randn(len(batch), ls, vs, generator=g) * 3
    # TRL's answer region: every content token after each sample's first (dropped) chunk.
    t_labels, s_labels = torch.full((2, lt), -100), torch.full((2, ls), -100)
    for b in range(len(batch)):
        chunks = np.flatnonzero(alignment.chunk_sample == b)
        first = chunks[1]
        t0, s0 = int(alignment.teacher_first[first]), int(alignment.student_first[first])
        t1 = int(alignment.teacher_first[chunks[-1]] + alignment.teacher_count[chunks[-1]])
        s1 = int(alignment.student_first[chunks[-1]] + alignment.student_count[chunks[-1]])
        t_labels[b, t0:t1] = torch.as_tensor(t_enc[b].ids[t0:t1])
        s_labels[b, s0:s1] = torch.as_tensor(s_enc[b].ids[s0:s1])
    return dict(
        alignment=alignment, teacher=teacher, student=student, vt=vt, vs=vs,
        t_ids=pad([e.ids for e in t_enc], lt, 0), s_ids=pad([e.ids for e in s_enc], ls, 0),
        t_offsets=pad([e.spans for e in t_enc], lt, 0), s_offsets=pad([e.spans for e in s_enc], ls, 0),
        t_labels=t_labels, s_labels=s_labels,
    )


def trl_loss(inputs, module) -> tuple[torch.Tensor, torch.Tensor]:
    student = shifted(inputs["student"]).requires_grad_()
    loss = module(student, shifted(inputs["teacher"]), inputs["s_labels"], inputs["t_labels"], inputs["s_ids"],
                  inputs["t_ids"], student_byte_offsets=inputs["s_offsets"], teacher_byte_offsets=inputs["t_offsets"])
    (g,) = torch.autograd.grad(loss, student)
    return loss.detach(), g[:, 1:]  # TRL's row j + 1 is our row j


def ours(inputs, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    student = inputs["student"].clone().requires_grad_()
    loss = CrossTokenizerKDLoss(merge="observed", reduction="none", teacher_vocab_size=inputs["vt"],
                                student_vocab_size=inputs["vs"], block_rows=16, **kw)
    out = loss(student, inputs["teacher"], inputs["alignment"], student_input_ids=inputs["s_ids"],
               teacher_input_ids=inputs["t_ids"])
    sample = torch.as_tensor(inputs["alignment"].rows(only_loss=True).sample)
    per_sample = torch.zeros(2).index_add(0, sample, out.loss) / torch.bincount(sample, minlength=2)
    total = per_sample.mean()
    (g,) = torch.autograd.grad(total, student)
    return total.detach(), g[:, :-1]


def assert_grad_close(g: torch.Tensor, g_ref: torch.Tensor) -> None:
    """Gradients agree up to fp32 rounding; where two sorted probabilities are within rounding of each other the
    sign of their difference (the L1 gradient) may flip, which moves a handful of entries by ~1e-7."""
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6)
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-4


def test_inputs_have_multi_token_chunks(inputs):
    al = inputs["alignment"]
    assert al.aligned_share == 1.0
    assert bool(((al.teacher_count > 1) | (al.student_count > 1)).any())


def test_uld_matches_trl(inputs, qwen, llama):
    ref, g_ref = trl_loss(inputs, gold.ULDLoss(gold_config(False), student_tokenizer=llama.hf,
                                                teacher_tokenizer=qwen.hf))
    got, g = ours(inputs, mapping="uld")
    assert abs(float(got) - float(ref)) < 1e-5
    assert_grad_close(g, g_ref)


def test_hybrid_matches_trl(inputs, qwen, llama):
    module = gold.ULDLoss(gold_config(True), student_tokenizer=llama.hf, teacher_tokenizer=qwen.hf)
    pairs = sorted(module._vocab_mapping.items())
    t_ids = torch.tensor([t for t, _ in pairs])
    s_ids = torch.tensor([s for _, s in pairs])
    ref, g_ref = trl_loss(inputs, module)
    got, g = ours(inputs, mapping="hybrid", divergence="jsd", beta=0.5, matched_pairs=(t_ids, s_ids))
    assert abs(float(got) - float(ref)) < 1e-5
    assert_grad_close(g, g_ref)
