"""CrossTokenizerCollator: examples -> both tokenizations, padded, plus their batched Alignment.

Two kinds of examples:

* ``{"text": "..."}``: each tokenizer encodes the text as its model sees it (BOS/EOS added by the tokenizer get
  empty spans and belong to no chunk).
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: each side renders the conversation with its OWN chat
  template. Only message content is aligned; template markers (``<|im_start|>assistant\\n``,
  ``<|start_header_id|>...``, a default system prompt) are in no chunk. Spans are moved into a shared *content
  coordinate system*: message ``k``'s bytes follow message ``k-1``'s after a one-byte gap, so no chunk crosses a
  message boundary. Where a template rewrites content (Llama 3 trims it), the bytes one side lacks are reported
  as unaligned, never paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from .sequence import Alignment, align_spans
from .tokenizer import TokenizerView, char_to_byte_offsets, load_tokenizer

__all__ = ["CrossTokenizerCollator", "render_chat", "EncodedExample"]

LossOn = Literal["all", "assistant"]
_LOSS_ON = ("all", "assistant")


def render_chat(view: TokenizerView, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int, int]]]:
    """Render ``messages`` with ``view``'s chat template and find each message's content in the result.

    Returns:
        ``(rendered, regions)``; ``regions[k] = (char_start, char_len, content_offset)`` says that
        ``rendered[char_start : char_start + char_len] == content_k[content_offset : content_offset + char_len]``
        (``content_offset > 0`` where the template trimmed leading whitespace; ``char_len == 0`` where the
        template dropped the message).
    """
    if not view.has_chat_template:
        raise ValueError(
            f"{view.name} has no chat template, so {{'messages': [...]}} examples cannot be rendered for it; set "
            "tokenizer.chat_template or pass {'text': ...} examples"
        )
    msgs = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {k} must be a mapping with 'role' and a str 'content', got {msg!r}")
        msgs.append(dict(msg))
    if not msgs:
        raise ValueError("an example has an empty 'messages' list: there is nothing to align")
    rendered = view.hf.apply_chat_template(msgs, tokenize=False)
    # Render once more with a unique marker as each content: the text between markers is template text.
    markers = [f"\u2063xtok{k}\u2063" for k in range(len(msgs))]
    marked = view.hf.apply_chat_template([{**m, "content": markers[k]} for k, m in enumerate(msgs)], tokenize=False)
    regions: list[tuple[int, int, int]] = []
    src, out = 0, 0  # cursors in `marked` and in `rendered`
    for k, marker in enumerate(markers):
        at = marked.find(marker, src)
        if at < 0:
            regions.append((out, 0, 0))
            continue
        template = marked[src:at]
        if not rendered.startswith(template, out):
            raise ValueError(f"{view.name}'s chat template renders differently around message {k}; cannot align it")
        out += len(template)
        content = msgs[k]["content"]
        lead = len(content) - len(content.lstrip())
        for variant, offset in ((content, 0), (content.strip(), lead), (content.rstrip(), 0), (content.lstrip(), lead)):
            if rendered.startswith(variant, out):
                regions.append((out, len(variant), offset))
                out += len(variant)
                break
        else:
            raise ValueError(
                f"{view.name}'s chat template rewrites the content of message {k} ({msgs[k]['role']!r}) beyond "
                "trimming; xtok_kd can only align content that the template keeps as is or trimmed"
            )
        src = at + len(marker)
    if rendered[out:] != marked[src:]:
        raise ValueError(f"{view.name}'s chat template renders the end of the conversation differently; cannot align")
    return rendered, regions


@dataclass(frozen=True)
class EncodedExample:
    """One side of one example: ids and spans in the example's byte coordinates."""

    ids: np.ndarray  # (n,) int64
    spans: np.ndarray  # (n, 2) int64; empty for tokens that are not content
    seam_tokens: int = 0  # tokens straddling a content edge, clipped to the content


def _encode_chat(view: TokenizerView, messages: Sequence[Mapping[str, Any]], dest: np.ndarray) -> EncodedExample:
    """Encode the rendered chat and move spans into content coordinates (message k starts at ``dest[k]``)."""
    rendered, regions = render_chat(view, messages)
    enc = view.encode(rendered, add_special_tokens=False)
    cb = char_to_byte_offsets(rendered)
    r_start = np.array([cb[s] for s, n, _ in regions], dtype=np.int64)
    r_end = np.array([cb[s + n] for s, n, _ in regions], dtype=np.int64)
    lead = np.array([len(m["content"][:off].encode("utf-8")) for m, (_, _, off) in zip(messages, regions)],
                    dtype=np.int64)
    shift = dest + lead - r_start
    a, b = enc.spans[:, 0], enc.spans[:, 1]
    # The region a token overlaps: the last one starting at or before its start, or else the next one.
    r = np.clip(np.searchsorted(r_start, a, side="right") - 1, 0, len(regions) - 1)
    nxt = np.minimum(r + 1, len(regions) - 1)
    use_next = (a >= r_end[r]) & (b > r_start[nxt]) & (nxt != r)
    r = np.where(use_next, nxt, r)
    lo, hi = np.maximum(a, r_start[r]), np.minimum(b, r_end[r])
    inside = (hi > lo) & (b > a)
    seam = int((inside & ((lo != a) | (hi != b))).sum())
    spans = np.zeros_like(enc.spans)
    spans[inside, 0] = lo[inside] + shift[r[inside]]
    spans[inside, 1] = hi[inside] + shift[r[inside]]
    # Template tokens get an empty span at the end of the content before them (keeps spans monotone).
    run = np.maximum.accumulate(np.where(inside, spans[:, 1], 0))
    spans[~inside] = run[~inside, None]
    return EncodedExample(enc.ids, spans, seam)


class CrossTokenizerCollator:
    """Collate examples into padded teacher and student inputs plus their :class:`~xtok_kd.Alignment`.

    Args:
        teacher / student: anything :func:`~xtok_kd.load_tokenizer` accepts.
        max_length: truncate both sides to this many tokens (overridden per side by the two below). Bytes that
            one side loses to truncation are reported in ``alignment.unaligned_bytes``, never paired.
        teacher_max_length / student_max_length: per-side limits.
        loss_on: ``"all"`` content, or ``"assistant"`` content only (chat examples): sets
            ``alignment.chunk_loss_mask`` and the student labels.
        pad_to_multiple_of: round padded lengths up.

    Returns (from ``__call__``) a dict: ``teacher_input_ids``, ``teacher_attention_mask``, ``student_input_ids``,
    ``student_attention_mask`` (``(B, L)`` int64 tensors), ``student_labels`` (``(B, Ls)``: the input ids where the
    token is content that counts for the loss, else -100) and ``alignment``.
    """

    def __init__(
        self,
        teacher: Any,
        student: Any,
        *,
        max_length: int | None = None,
        teacher_max_length: int | None = None,
        student_max_length: int | None = None,
        loss_on: LossOn = "all",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if loss_on not in _LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r} is not one of {_LOSS_ON}")
        for name, value in (("max_length", max_length), ("teacher_max_length", teacher_max_length),
                            ("student_max_length", student_max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.teacher = load_tokenizer(teacher)
        self.student = load_tokenizer(student)
        self.teacher_max_length = teacher_max_length or max_length
        self.student_max_length = student_max_length or max_length
        self.loss_on = loss_on
        self.pad_to_multiple_of = pad_to_multiple_of
        self._table: Any = None

    @property
    def table(self) -> Any:
        """The teacher/student vocabulary table, built on first use and cached on disk
        (:func:`xtok_kd.vocab.get_or_build`): pass it to :class:`~xtok_kd.CrossTokenizerKDLoss`."""
        if self._table is None:
            from .vocab import get_or_build

            self._table = get_or_build(self.teacher, self.student)
        return self._table

    def encode_example(self, example: Mapping[str, Any]) -> tuple[EncodedExample, EncodedExample, np.ndarray]:
        """Both sides of one example, and the content-coordinate start of every assistant byte range
        (``(R, 2)`` ranges that count for the loss)."""
        if not isinstance(example, Mapping) or ("text" in example) == ("messages" in example):
            keys = list(example) if isinstance(example, Mapping) else type(example).__name__
            raise ValueError(f"each example needs exactly one of 'text' or 'messages'; got {keys}")
        if "text" in example:
            text = example["text"]
            sides = []
            for view in (self.teacher, self.student):
                enc = view.encode(text)
                sides.append(EncodedExample(enc.ids, enc.spans))
            loss_ranges = np.array([[0, len(text.encode("utf-8"))]], dtype=np.int64)
            return sides[0], sides[1], loss_ranges
        messages = example["messages"]
        sizes = np.array([len(m["content"].encode("utf-8")) if isinstance(m, Mapping) and isinstance(
            m.get("content"), str) else 0 for m in messages], dtype=np.int64)
        dest = np.concatenate(([0], np.cumsum(sizes + 1)[:-1])).astype(np.int64)
        teacher = _encode_chat(self.teacher, messages, dest)
        student = _encode_chat(self.student, messages, dest)
        counted = [k for k, m in enumerate(messages) if self.loss_on == "all" or m.get("role") == "assistant"]
        loss_ranges = np.array([[dest[k], dest[k] + sizes[k]] for k in counted], dtype=np.int64).reshape(-1, 2)
        return teacher, student, loss_ranges

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("CrossTokenizerCollator got an empty batch")
        encoded = [self.encode_example(ex) for ex in examples]
        t_ids, t_spans, t_mask = self._pad([e[0] for e in encoded], self.teacher, self.teacher_max_length)
        s_ids, s_spans, s_mask = self._pad([e[1] for e in encoded], self.student, self.student_max_length)
        alignment = align_spans(t_spans, s_spans)
        # Chunks that count: those inside a loss range of their sample.
        counts = np.zeros(alignment.num_chunks, dtype=bool)
        for b, (_, _, ranges) in enumerate(encoded):
            sel = np.flatnonzero(alignment.chunk_sample == b)
            starts = alignment.chunk_bytes[sel, 0]
            k = np.searchsorted(ranges[:, 0], starts, side="right") - 1
            ok = (k >= 0) & (starts < ranges[np.maximum(k, 0), 1]) if ranges.shape[0] else np.zeros_like(k, bool)
            counts[sel] = ok
        alignment = alignment.with_loss_mask(counts)
        labels = np.where(alignment.student_chunk >= 0, s_ids, -100)
        in_loss = np.zeros_like(labels, dtype=bool)
        valid = alignment.student_chunk >= 0
        in_loss[valid] = counts[alignment.student_chunk[valid]]
        labels = np.where(in_loss, labels, -100)
        return {
            "teacher_input_ids": torch.as_tensor(t_ids),
            "teacher_attention_mask": torch.as_tensor(t_mask),
            "student_input_ids": torch.as_tensor(s_ids),
            "student_attention_mask": torch.as_tensor(s_mask),
            "student_labels": torch.as_tensor(labels),
            "alignment": alignment,
            "seam_tokens": sum(e[0].seam_tokens + e[1].seam_tokens for e in encoded),
        }

    def _pad(self, sides: list[EncodedExample], view: TokenizerView, max_length: int | None):
        lengths = [min(len(s.ids), max_length) if max_length else len(s.ids) for s in sides]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = next((i for i in (view.hf.pad_token_id, view.hf.eos_token_id) if i is not None), 0)
        ids = np.full((len(sides), width), pad_id, dtype=np.int64)
        spans = np.zeros((len(sides), width, 2), dtype=np.int64)
        mask = np.zeros((len(sides), width), dtype=np.int64)
        for b, (side, n) in enumerate(zip(sides, lengths)):
            ids[b, :n] = side.ids[:n]
            spans[b, :n] = side.spans[:n]
            spans[b, n:] = side.spans[n - 1, 1] if n else 0
            mask[b, :n] = 1
        return ids, spans, mask
