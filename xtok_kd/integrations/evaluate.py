"""Held-out bits per byte: a language model's quality in a unit that does not depend on its tokenizer.

``bits_per_byte = sum of -log2 p(token | context) over the text's tokens / UTF-8 bytes of the text``. Two models with
different tokenizers scored on the same texts are directly comparable (per-token perplexities are not).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["bits_per_byte", "score_texts"]


def _start_id(hf: Any) -> int:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf, name, None)
        if value is not None:
            return int(value)
    return 0


def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512, batch_size: int = 8,
                device: Any = None, progress: bool = False) -> tuple[float, int]:
    """``(total negative log-likelihood in nats, total UTF-8 bytes)`` of ``texts`` under ``model``.

    Each text is encoded without special tokens and cut into windows of ``max_length - 1`` tokens; every window starts
    with one context token (BOS, else EOS, else pad), so every token of the text is predicted exactly once. Context does
    not cross windows (the same rule for every model keeps the comparison fair).

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``).
        tokenizer: anything :func:`xtok_kd.load_tokenizer` takes, or a Hugging Face tokenizer.
        texts: the held-out texts (empty ones are skipped).
        max_length: tokens per window, context token included (``>= 2``).
        batch_size: windows per forward pass.
        device: where to run (default: the model's device).
        progress: show a progress bar.
    """
    import torch
    from tqdm.auto import tqdm

    from ..tokenizer import load_tokenizer

    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    hf = load_tokenizer(tokenizer).hf
    start = _start_id(hf)
    windows: list[list[int]] = []
    total_bytes = 0
    for text in texts:
        if not text:
            continue
        total_bytes += len(text.encode("utf-8"))
        ids = hf(text, add_special_tokens=False)["input_ids"]
        step = max_length - 1
        windows.extend([start] + ids[i:i + step] for i in range(0, len(ids), step))
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(windows), batch_size), desc="bits per byte", disable=not progress,
                          leave=False):
                group = windows[i:i + batch_size]
                width = max(len(w) for w in group)
                ids = torch.full((len(group), width), start, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for b, w in enumerate(group):
                    ids[b, :len(w)] = torch.tensor(w)
                    mask[b, :len(w)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                logits = logits[:, :-1, : len(hf)] if logits.shape[-1] > len(hf) else logits[:, :-1]
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"))
    finally:
        model.train(was_training)
    return nll, total_bytes


def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> float:
    """Held-out bits per UTF-8 byte of ``texts`` under ``model`` (lower is better); see :func:`score_texts`."""
    nll, total = score_texts(model, tokenizer, texts, **kwargs)
    if total == 0:
        raise ValueError("bits_per_byte needs at least one non-empty text")
    return nll / math.log(2) / total
