"""Text written by the teacher, for sequence-level distillation (SeqKD, Kim & Rush 2016).

Each training row's opening is kept as a prompt and the teacher samples the rest: the student then trains on the
teacher's text, beside the corpus (``rows + generate_teacher_texts(...)``), with or without a token-level KD term on
top. The rows travel as text, so the student's tokenizer plays no part here and the collator aligns them like any
other row; a teacher cache (:func:`xtok_kd.teacher_cache.write_teacher_cache`) of the combined rows holds the
teacher's top-k over the teacher's own text too. On the command line: ``xtok-kd cache-teacher --add-teacher-text``
and ``xtok-kd distill --add-teacher-text``.

``benchmarks/quality.py`` measures it: SeqKD alone, the corpus plus the teacher's text, and that with a KD term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..tokenizer import TokenizerView, load_tokenizer
from .on_policy import Prompt, _content, sample_completions, split_prompt

__all__ = ["generate_teacher_texts"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(*, prompt_share: Any, temperature: Any, max_length: Any, batch_size: Any, seed: Any) -> None:
    """ValueError naming the first bad option, its value and the range it must lie in."""

    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not finite(prompt_share) or not 0 < prompt_share < 1:
        raise ValueError(f"prompt_share must be a number strictly between 0 and 1 (the share of a row's teacher "
                         f"tokens kept as the prompt), got {prompt_share!r}")
    if not finite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (1.0: the teacher's own distribution), got "
                         f"{temperature!r}")
    if max_length is not None and (not _is_int(max_length) or max_length < 2):
        raise ValueError(f"max_length must be None (the rows' own lengths) or an int >= 2 (a prompt token and a "
                         f"written one), got {max_length!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _row_problem(row: Any) -> str | None:
    """Why ``row`` has no opening for the teacher to continue (None: it has)."""
    if isinstance(row, Mapping):
        if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            return None
        if "prompt" not in row and "completion" not in row and isinstance(row.get("text"), str):
            return None
        form = "a {'messages': [...]} row" if "messages" in row else f"a row with keys {sorted(map(str, row))}"
    else:
        form = f"a {type(row).__name__}"
    return (f"teacher text needs {{'text': str}} or {{'prompt': str, 'completion': str}} rows (the opening the "
            f"teacher continues), got {form}; render chats to text (e.g. with the tokenizer's chat template) or "
            "split them into prompt/completion rows")


def _rest_tokens(row: Mapping[str, Any], view: TokenizerView, prompt: Prompt, max_length: int | None) -> int:
    """Teacher content tokens of ``row`` after ``prompt`` (within ``max_length``; may be 0, unlike
    ``prompt.completion_tokens``)."""
    if "prompt" in row:
        full = row["prompt"] + row["completion"]
        _, spans, content = _content(view, full)
        kept = content[content < max_length] if max_length else content
        return int((spans[kept, 0] >= len(row["prompt"].encode("utf-8"))).sum())
    _, _, content = _content(view, row["text"])
    kept = content[content < max_length] if max_length else content
    return int((kept >= len(prompt.ids)).sum())  # the prompt's ids are the text's first ones


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

    The prompt of a ``{"text": t}`` row is ``t`` up to its ``m = max(1, floor(prompt_share * n))``-th teacher content
    token, ``n`` the content tokens within ``max_length``, moved forward to the first token from the ``m``-th on that
    ends on a character boundary: an exact prefix of ``t``. Of a ``{"prompt", "completion"}`` row: its prompt. The
    teacher samples (``temperature``, no top-k/top-p filtering) as many tokens as the rest of the row had, and no
    more than ``max_length`` minus the prompt's ids, stopping at EOS; a row with nothing left after its prompt comes
    back as the prompt alone (nothing is generated for it). Batched generation, seeded per batch
    (``seed + batch index``, so the text depends on ``batch_size`` too) without touching the caller's random
    streams: the same call gives the same text.

    Args:
        teacher: a causal LM with ``generate`` (any device; it is put in eval mode for the call and restored).
        teacher_tokenizer: anything :func:`xtok_kd.load_tokenizer` takes.
        rows: ``{"text": str}`` or ``{"prompt": str, "completion": str}`` rows (chat rows are refused).
        prompt_share: share of each text row's teacher tokens kept as the prompt, in (0, 1).
        temperature: the teacher's sampling temperature (> 0).
        max_length: teacher tokens per row (prompt + continuation, special tokens included, as the collator counts
            them); None: the rows' own lengths.
        batch_size: rows per ``generate`` call.
        seed: sampling seed (>= 0).
        progress: a tqdm bar over the rows.

    Returns:
        ``len(rows)`` dicts ``{"text": str}``; ``out[i]["text"]`` starts with the prompt of ``rows[i]``.

    Raises:
        ValueError: a bad ``prompt_share``/``temperature``/``max_length``/``batch_size``/``seed`` (naming it), or a
            row of another form (naming its index).
    """
    _check_options(prompt_share=prompt_share, temperature=temperature, max_length=max_length, batch_size=batch_size,
                   seed=seed)
    rows = list(rows)
    for i, row in enumerate(rows):  # every row checked before the first (slow) generation
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"row {i}: {problem}")
    view = load_tokenizer(teacher_tokenizer)
    prompts = [split_prompt(row, view, prompt_share=prompt_share, max_length=max_length) for row in rows]
    budgets = []
    for row, p in zip(rows, prompts):
        budget = _rest_tokens(row, view, p, max_length)
        budgets.append(budget if max_length is None else max(0, min(budget, max_length - len(p.ids))))
    from tqdm.auto import tqdm

    out: list[dict[str, str]] = []
    bar = tqdm(total=len(prompts), desc="teacher text", unit="row", disable=not progress)
    try:
        for start in range(0, len(prompts), batch_size):
            part, part_budgets = prompts[start:start + batch_size], budgets[start:start + batch_size]
            written = [b for b, budget in enumerate(part_budgets) if budget > 0]
            texts = [""] * len(part)
            if written:
                sampled, _ = sample_completions(teacher, view, [part[b] for b in written],
                                                [part_budgets[b] for b in written], temperature=temperature,
                                                seed=seed + start // batch_size)
                for b, text in zip(written, sampled):
                    texts[b] = text
            out += [{"text": p.text + t} for p, t in zip(part, texts)]
            bar.update(len(part))
    finally:
        bar.close()
    return out
