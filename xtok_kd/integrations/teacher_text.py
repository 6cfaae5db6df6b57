"""Text written by the teacher, for sequence-level distillation (SeqKD, Kim & Rush 2016).

Each training row's opening is kept as a prompt and the teacher samples the rest: the student then trains on the
teacher's text, beside the corpus (``rows + generate_teacher_texts(...)``), with or without a token-level KD term on
top. The rows travel as text, so the student's tokenizer plays no part here and the collator aligns them like any
other row; a teacher cache (:func:`xtok_kd.teacher_cache.write_teacher_cache`) of the combined rows holds the
teacher's top-k over the teacher's own text too.

``benchmarks/quality.py`` measures it: SeqKD alone, the corpus plus the teacher's text, and that with a KD term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..tokenizer import load_tokenizer
from .on_policy import check_on_policy_options, sample_completions, split_prompt

__all__ = ["generate_teacher_texts"]


def generate_teacher_texts(
    teacher: Any,
    teacher_tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    prompt_share: float = 0.25,
    temperature: float = 1.0,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, str]]:
    """One teacher-written ``{"text": prompt + continuation}`` row per input row, in order.

    The prompt of a ``{"text": t}`` row is ``t`` up to its ``max(1, floor(prompt_share * n))``-th teacher token (of
    the ``n`` within ``max_length``; cut on a character boundary, an exact prefix of ``t``), of a ``{"prompt",
    "completion"}`` row its prompt; the teacher samples (``temperature``, no top-k/top-p filtering) as many tokens
    as the rest of the row had, at most up to ``max_length``, stopping at EOS. Batched generation, seeded per batch
    (``seed + batch index``) without touching the caller's random streams: the same call gives the same text.

    Args:
        teacher: a causal LM with ``generate`` (any device; it is put in eval mode for the call and restored).
        teacher_tokenizer: anything :func:`xtok_kd.load_tokenizer` takes.
        rows: ``{"text": str}`` or ``{"prompt": str, "completion": str}`` rows (chat rows are refused).
        prompt_share: share of each text row's teacher tokens kept as the prompt, in (0, 1).
        temperature: the teacher's sampling temperature (> 0).
        max_length: teacher tokens per row (prompt + continuation); None: the rows' own lengths.
        batch_size: rows per ``generate`` call.
        seed: sampling seed.
        progress: a tqdm bar over the rows.

    Raises:
        ValueError: a bad ``prompt_share``/``temperature``/``batch_size``/``max_length``, or a row of another form
            (naming its index).
    """
    check_on_policy_options(lmbda=0.0, max_new_tokens=None, on_policy_temperature=temperature,
                            prompt_share=prompt_share)
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2 - (
                name == "batch_size")):
            raise ValueError(f"{name} must be an int >= {1 if name == 'batch_size' else 2}, got {value!r}")
    view = load_tokenizer(teacher_tokenizer)
    prompts = []
    for i, row in enumerate(rows):
        try:
            prompts.append(split_prompt(row, view, prompt_share=prompt_share, max_length=max_length))
        except ValueError as err:
            raise ValueError(f"row {i}: {str(err).replace('on-policy distillation (lmbda > 0)', 'teacher text')}"
                             ) from None
    budgets = [max(1, p.completion_tokens if max_length is None else min(p.completion_tokens,
                                                                          max_length - len(p.ids)))
               for p in prompts]
    from tqdm.auto import tqdm

    out: list[dict[str, str]] = []
    bar = tqdm(total=len(prompts), desc="teacher text", unit="row", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        part = prompts[start:start + batch_size]
        texts, _ = sample_completions(teacher, view, part, budgets[start:start + batch_size],
                                      temperature=temperature, seed=seed + start // batch_size)
        out += [{"text": p.text + t} for p, t in zip(part, texts)]
        bar.update(len(part))
    bar.close()
    return out
