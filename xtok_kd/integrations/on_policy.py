"""On-policy distillation for :class:`~xtok_kd.integrations.CrossTokenizerKDTrainer`: GKD's ``lmbda`` mix.

With probability ``lmbda`` a training micro-batch is replaced by one the student wrote itself (Agarwal et al., 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"): each row is cut into a prompt
and the rest, the student samples a continuation of the prompt, and the teacher grades the student's own text. The
two models share no token ids, so the continuation travels as TEXT: the new row ``{"prompt": ..., "completion":
...}`` is encoded again by both tokenizers and aligned by the collator, exactly like a dataset row. The KD loss covers
the completion only, and the student's cross-entropy is not applied to its own samples (its labels are all -100).

* prompt of a ``{"text": t}`` row: ``t`` up to the end of its ``m``-th student content token, ``m = max(1,
  floor(prompt_share * n))`` of the ``n`` content tokens the collator keeps (``max_length``), moved forward to the
  next token that ends on a character boundary (a byte-level token may hold half of a UTF-8 character); the
  student generates from those very ids. Of a ``{"prompt": p, "completion": c}`` row: ``p`` (its own encoding).
* completion: sampled (temperature, no top-k/top-p/min-p filtering, no repetition penalty: the model's
  ``generation_config`` is overridden) for as many tokens as the row's original completion had (``n - m``, at least
  1; ``max_new_tokens`` when given), at most to the collator's ``student_max_length``; it stops at EOS. Decoded as
  ``decode(prompt_ids + generated)`` minus ``decode(prompt_ids)`` when that is a prefix, else ``decode(generated)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..tokenizer import TokenizerView, char_to_byte_offsets

__all__ = ["Prompt", "check_on_policy_options", "on_policy_batch", "sample_completions", "split_prompt"]

#: The keys of a row that the collator reads (what a batch keeps of its rows for on-policy generation).
ROW_KEYS = ("text", "messages", "prompt", "completion")


class Prompt(NamedTuple):
    """Where the student starts writing.

    Attributes:
        text: the prompt text (for a text row, an exact prefix of it, cut at a character boundary).
        ids: the student ids to generate from (BOS included where the tokenizer adds one; may be empty).
        completion_tokens: student content tokens of the row's original completion (>= 1).
    """

    text: str
    ids: list[int]
    completion_tokens: int


def check_on_policy_options(*, lmbda: Any, max_new_tokens: Any, on_policy_temperature: Any,
                            prompt_share: Any) -> tuple[float, int | None, float, float]:
    """The options, validated: ``(lmbda, max_new_tokens, on_policy_temperature, prompt_share)``.

    Raises:
        ValueError: naming the bad value and the range it must lie in.
    """

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not number(lmbda) or not 0 <= lmbda <= 1:
        raise ValueError(f"lmbda must be a probability in [0, 1] (the share of on-policy micro-batches; 0: off), "
                         f"got {lmbda!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be None (as many as the row's completion had) or an int >= 1, got "
                         f"{max_new_tokens!r}")
    if not number(on_policy_temperature) or on_policy_temperature <= 0:
        raise ValueError(f"on_policy_temperature must be a finite number > 0 (1.0: the student's own distribution), "
                         f"got {on_policy_temperature!r}")
    if not number(prompt_share) or not 0 < prompt_share < 1:
        raise ValueError(f"prompt_share must be a number strictly between 0 and 1 (the share of a text row's "
                         f"tokens kept as the prompt), got {prompt_share!r}")
    return float(lmbda), max_new_tokens, float(on_policy_temperature), float(prompt_share)


def _content(view: TokenizerView, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids (n,), spans (n, 2), indices of the content tokens)`` of ``text`` as the collator encodes it."""
    enc = view.encode(text)
    spans = enc.spans.reshape(-1, 2)
    return enc.ids, spans, np.flatnonzero(spans[:, 1] > spans[:, 0])


def split_prompt(row: Mapping[str, Any], view: TokenizerView, *, prompt_share: float = 0.5,
                 max_length: int | None = None) -> Prompt:
    """The prompt of one row (see the module docstring) and the length of the completion it replaces.

    Args:
        row: ``{"text": str}`` or ``{"prompt": str, "completion": str}``.
        view: the student's tokenizer.
        prompt_share: share of a text row's student content tokens kept as the prompt, in (0, 1).
        max_length: the collator's student ``max_length`` (tokens past it do not count).

    Raises:
        ValueError: a ``{"messages": ...}`` row or any other form.
    """
    if "prompt" in row and "completion" in row and isinstance(row["prompt"], str):
        prompt = row["prompt"]
        ids, spans, content = _content(view, prompt)
        # Up to the last content token: no EOS a tokenizer may append (the student continues the text).
        head = ids[: content[-1] + 1] if content.size else ids[:0]
        _, full_spans, full_content = _content(view, prompt + str(row["completion"]))
        kept = full_content[full_content < max_length] if max_length else full_content
        rest = int((full_spans[kept, 0] >= len(prompt.encode("utf-8"))).sum())
        return Prompt(prompt, head.tolist(), max(rest, 1))
    if "text" not in row or not isinstance(row["text"], str):
        form = "a {'messages': [...]} row" if "messages" in row else f"a row with keys {list(row)}"
        raise ValueError(f"on-policy distillation (lmbda > 0) needs {{'text': str}} or {{'prompt': str, "
                         f"'completion': str}} rows (the prompt the student continues), got {form}; render chats to "
                         f"text or split them into prompt/completion rows, or set lmbda=0")
    text = row["text"]
    ids, spans, content = _content(view, text)
    kept = content[content < max_length] if max_length else content
    n = int(kept.size)
    if n == 0:  # no content: the student writes from its start token
        return Prompt("", [], 1)
    m = min(max(1, math.floor(prompt_share * n)), n)
    # Cut after the first content token from the m-th on that ends on a character boundary (the last one does).
    boundary = np.zeros(len(text.encode("utf-8")) + 1, dtype=bool)
    boundary[char_to_byte_offsets(text)] = True
    j = m - 1 + int(np.argmax(boundary[spans[content[m - 1:], 1]]))
    end = int(spans[content[j], 1])
    prompt = text.encode("utf-8")[:end].decode("utf-8", errors="ignore")  # a boundary but where none is left
    return Prompt(prompt, ids[: content[j] + 1].tolist(), max(n - j - 1, 1))


def sample_completions(model: Any, view: TokenizerView, prompts: Sequence[Prompt], budgets: Sequence[int], *,
                       temperature: float = 1.0, seed: int = 0) -> tuple[list[str], int]:
    """Sample the student's continuation of each prompt; ``(completion texts, tokens generated)``.

    One batched ``model.generate`` (LEFT padding), under ``torch.no_grad()`` with the model in eval mode (its mode is
    restored), seeded with ``seed`` inside :func:`torch.random.fork_rng`, so the caller's random streams are
    untouched. Row ``b`` keeps at most ``budgets[b]`` tokens, cut at the first EOS.

    Args:
        model: a causal LM with ``generate`` (the unwrapped student).
        view: its tokenizer (``view.hf`` decodes).
        prompts: from :func:`split_prompt`; an empty ``ids`` starts from BOS (else EOS, else id 0).
        budgets: new tokens per row, each >= 1.
        temperature: sampling temperature (> 0).
        seed: the sampling seed.
    """
    from transformers import GenerationConfig

    hf = view.hf
    eos = hf.eos_token_id
    pad = next((i for i in (hf.pad_token_id, eos) if i is not None), 0)
    start = next((i for i in (hf.bos_token_id, eos) if i is not None), 0)
    seqs = [list(p.ids) or [start] for p in prompts]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, s in enumerate(seqs):
        input_ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    # Every filter the model's own generation_config might switch on is set to its neutral value here.
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                              epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                              num_beams=1, min_new_tokens=0, max_new_tokens=max(budgets), pad_token_id=pad,
                              eos_token_id=eos)
    device = next(model.parameters()).device
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
    finally:
        model.train(was_training)
    completions, generated = [], 0
    for s, new, budget in zip(seqs, out[:, width:].tolist(), budgets):
        new = new[:budget]
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        generated += len(new)
        full, head = hf.decode(s + new, skip_special_tokens=True), hf.decode(s, skip_special_tokens=True)
        completions.append(full[len(head):] if full.startswith(head) else hf.decode(new, skip_special_tokens=True))
    return completions, generated


def on_policy_batch(collator: Any, rows: Sequence[Mapping[str, Any]], model: Any, *, prompt_share: float = 0.5,
                    max_new_tokens: int | None = None, temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The on-policy batch of ``rows``: the student continues each row's prompt, and ``collator`` collates the
    ``{"prompt": ..., "completion": ...}`` rows that result.

    Args:
        collator: a :class:`~xtok_kd.integrations.trainer.DistillationCollator` (its student tokenizer and
            ``student_max_length`` are used).
        rows: the rows of an off-policy batch (``batch["rows"]``).
        model: the student (unwrapped).
        prompt_share / max_new_tokens / temperature / seed: see the module docstring.

    Returns:
        the collator's batch with ``student_labels`` all -100 (no cross-entropy on the student's own samples; the
        KD chunks cover the completions only), ``on_policy`` = 1 and ``generated_tokens`` (int).
    """
    inner = collator.collator
    view, max_length = inner.student, inner.student_max_length
    prompts = [split_prompt(row, view, prompt_share=prompt_share, max_length=max_length) for row in rows]
    budgets = []
    for p in prompts:
        budget = max_new_tokens if max_new_tokens is not None else p.completion_tokens
        if max_length:
            budget = min(budget, max_length - len(p.ids))
        budgets.append(max(budget, 1))
    completions, generated = sample_completions(model, view, prompts, budgets, temperature=temperature, seed=seed)
    batch = collator([{"prompt": p.text, "completion": c} for p, c in zip(prompts, completions)])
    batch["student_labels"] = torch.full_like(batch["student_labels"], -100)
    batch["on_policy"], batch["generated_tokens"] = 1, generated
    return batch
