"""The loss on real tokenizers and real vocabulary tables (Qwen2.5 teacher; Qwen2.5 or Llama-3.2 student)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import corpus_text
from xtok_kd.losses import CrossTokenizerKDLoss, sorted_l1, token_kd_loss
from xtok_kd.sequence import align_spans

vocab = pytest.importorskip("xtok_kd.vocab", reason="xtok_kd.vocab (the vocabulary table) is not available")

QWEN_PADDED_WIDTH = 151_936


@pytest.fixture(scope="module")
def qwen_qwen(qwen):
    return vocab.VocabAlignment.build(qwen, qwen)


@pytest.fixture(scope="module")
def qwen_llama(qwen, llama):
    return vocab.VocabAlignment.build(qwen, llama)


def test_same_tokenizer_projection_fkl_is_token_level_kl(qwen, qwen_qwen):
    """Real table, same tokenizer, the model's padded width: projection-FKL equals plain token-level KL computed on
    the tokenizer's 151,665 columns (the padding columns are sliced off first)."""
    text = corpus_text()[:400]
    enc = qwen.encode(text)
    al = align_spans([enc], [enc])
    n = len(enc)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, n, QWEN_PADDED_WIDTH, generator=g) * 3
    t = torch.randn(1, n, QWEN_PADDED_WIDTH, generator=g) * 3
    out = CrossTokenizerKDLoss(table=qwen_qwen, mapping="projection", divergence="fkl")(s, t, al)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, torch.as_tensor(al.rows().student_row)] = True
    v = qwen.vocab_size
    plain = token_kd_loss(s[..., :v], t[..., :v], mask, divergence_name="fkl")
    assert out.metrics["teacher_mass_mapped"] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(out.loss, plain, rtol=2e-6, atol=1e-6)


def test_qwen_to_llama_projection_reaches_number_tokens(qwen, llama, qwen_llama):
    """Llama's "123" reaches the loss through Qwen's "1" (student_to_teacher): it gets a gradient of its own."""
    text = "In 1623 the Folio sold for 20 shillings. " + corpus_text()[:200]
    t_enc, s_enc = qwen.encode(text), llama.encode(text)
    al = align_spans([t_enc], [s_enc])
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(1, len(s_enc), llama.vocab_size, generator=g) * 3).requires_grad_()
    t = torch.randn(1, len(t_enc), QWEN_PADDED_WIDTH, generator=g) * 3
    out = CrossTokenizerKDLoss(table=qwen_llama, mapping="projection", divergence="fkl")(s, t, al)
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0.5 < out.metrics["teacher_mass_mapped"] <= 1.0
    assert out.metrics["aligned_share"] == 1.0
    number = llama.hf.convert_tokens_to_ids("123")
    one = qwen.hf.convert_tokens_to_ids("1")
    src, dst, _ = qwen_llama.projection("student_to_teacher")
    assert int(dst[torch.as_tensor(src) == number][0]) == one
    rows = torch.as_tensor(al.rows().student_row)
    assert bool((s.grad[0, rows, number] != 0).all())


def test_bf16_padded_inputs_match_fp32(qwen, llama, qwen_llama):
    text = corpus_text()[:300]
    t_enc, s_enc = qwen.encode(text), llama.encode(text)
    al = align_spans([t_enc], [s_enc])
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(1, len(s_enc), llama.vocab_size, generator=g) * 3).bfloat16()
    t = (torch.randn(1, len(t_enc), QWEN_PADDED_WIDTH, generator=g) * 3).bfloat16()
    loss = CrossTokenizerKDLoss(table=qwen_llama, mapping="projection", divergence="akl")
    a = loss(s, t, al).loss
    b = loss(s.float(), t.float(), al).loss
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # same rounded inputs, fp32 math on both


def test_sorted_l1_gradcheck_and_radix_order():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(3, 9, dtype=torch.float64, generator=g).requires_grad_()
    q = torch.rand(3, 6, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(sorted_l1, (p, q), eps=1e-7, atol=1e-6)
    # fp32 CPU takes the radix path: with heavy ties it must equal the comparison-sort result.
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (4, 3000)).astype(np.float32) / 1000)
    y = torch.rand(4, 2500, generator=g)
    ref = (torch.sort(x, -1, descending=True).values[:, :2500] - torch.sort(y, -1, descending=True).values).abs().sum(-1)
    ref = ref + torch.sort(x, -1, descending=True).values[:, 2500:].sum(-1)
    xs = x.clone().requires_grad_()
    got = sorted_l1(xs, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert set(xs.grad.unique().tolist()) <= {-1.0, 0.0, 1.0}
