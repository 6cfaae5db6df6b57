"""CrossTokenizerCollator: examples -> both tokenizations, padded, plus their batched Alignment.

Three kinds of examples:

* ``{"text": "..."}``: each tokenizer encodes the text as its model sees it (BOS/EOS added by the tokenizer get
  empty spans and belong to no chunk). An empty text gives a sample with no content and no chunk.
* ``{"prompt": "...", "completion": "..."}``: encoded as the text ``prompt + completion``; the loss (KD chunks and
  student labels) covers the completion's bytes only, whatever ``loss_on`` says; all of the text is content.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: each side renders the conversation with its OWN chat
  template. Only message content is aligned; template markers (``<|im_start|>assistant\\n``,
  ``<|start_header_id|>...``, a default system prompt) are in no chunk, and so is a token that straddles template
  text and content (Qwen merges content's leading ``\\n\\n`` with its template's ``\\n``; SentencePiece merges the
  template's trailing space with the first word): its bytes are reported as unaligned, never paired. Spans are
  moved into a shared *content coordinate system*: message ``k``'s bytes follow message ``k-1``'s after a
  one-byte separator that no token covers, so no chunk crosses a message boundary and the separators count as
  neither covered nor unaligned. Where a template rewrites content (Llama 3 trims it), the bytes one side lacks
  are reported as unaligned, never paired. A message that only one side's template renders (an unknown role
  such as ``"function"`` that Qwen drops; a tool turn that Llama JSON-quotes) is counted in
  ``batch["dropped_messages"]``, warned about, and its bytes are unaligned: it is never paired with the other
  side's next message. Messages both sides drop are simply absent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import numpy as np

from .sequence import align_spans
from .tokenizer import TokenizerView, char_to_byte_offsets, load_tokenizer

__all__ = ["CrossTokenizerCollator", "render_chat", "ChatRegion", "EncodedExample", "EncodedPair"]

LossOn = Literal["all", "assistant"]
_LOSS_ON = ("all", "assistant")
RegionStatus = Literal["kept", "dropped", "rewritten"]


class ChatRegion(NamedTuple):
    """Where one message's content sits in a rendered chat.

    ``rendered[char_start : char_start + char_len] == content[content_offset : content_offset + char_len]`` when
    ``status == "kept"`` (``content_offset > 0`` where the template trimmed leading whitespace). ``"dropped"``:
    the template does not render the message (``char_len == 0``). ``"rewritten"``: the template renders the
    message but changes its content beyond trimming (JSON-quotes it, ...); ``rendered[char_start : char_start +
    char_len]`` is that rendering, which is not content and is aligned with nothing.
    """

    char_start: int
    char_len: int
    content_offset: int
    status: RegionStatus


def _who(view: TokenizerView, side: str | None) -> str:
    return f"the {side} tokenizer {view.name!r}" if side else f"tokenizer {view.name!r}"


def _apply_template(view: TokenizerView, msgs: list[dict], side: str | None, original: list[dict]) -> str:
    try:
        return view.hf.apply_chat_template(msgs, tokenize=False)
    except Exception as err:  # jinja2.TemplateError from raise_exception(), or any failure inside the template
        roles = [m.get("role") for m in original]
        odd = sorted({r for r in roles if r not in ("user", "assistant")}, key=str)
        if odd:
            hint = (f"merge the {', '.join(map(repr, odd))} turn(s) into the neighbouring user turn (e.g. a system "
                    "prompt as the first lines of the first user message) or drop them")
        else:
            hint = "make the roles alternate as this template expects (user first, then user/assistant in turn)"
        raise ValueError(
            f"{_who(view, side)}: its chat template rejected the conversation (roles {roles}): "
            f"{type(err).__name__}: {err}. Fix: {hint}; or use a {side + ' ' if side else ''}tokenizer whose chat "
            "template accepts these roles"
        ) from err


def render_chat(
    view: TokenizerView, messages: Sequence[Mapping[str, Any]], *, side: str | None = None
) -> tuple[str, list[ChatRegion]]:
    """Render ``messages`` with ``view``'s chat template and find each message's content in the result.

    Args:
        view: the tokenizer whose template renders the chat.
        messages: ``[{"role": str, "content": str}, ...]``.
        side: ``"teacher"`` or ``"student"``, named in error messages.

    Returns:
        ``(rendered, regions)``; ``regions[k]`` is a :class:`ChatRegion` for message ``k``.

    Raises:
        ValueError: a malformed message; a template that rejects the conversation (naming the side, the
            tokenizer, the template's message and the fix); a template whose output cannot be matched with the
            messages.
    """
    if not view.has_chat_template:
        raise ValueError(
            f"{_who(view, side)} has no chat template, so {{'messages': [...]}} examples cannot be rendered for it; "
            "set tokenizer.chat_template or pass {'text': ...} examples"
        )
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"'messages' must be a list of {{'role', 'content'}} mappings, got {type(messages).__name__}")
    msgs = []
    for k, msg in enumerate(messages):
        if (not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str)
                or not isinstance(msg.get("content"), str)):
            raise ValueError(f"message {k} must be a mapping with a str 'role' and a str 'content', got {msg!r}")
        msgs.append(dict(msg))
    if not msgs:
        raise ValueError("an example has an empty 'messages' list: there is nothing to align")
    rendered = _apply_template(view, msgs, side, msgs)
    try:
        return rendered, _locate(view, side, msgs, rendered, marked=[True] * len(msgs))
    except ValueError:
        # A template may treat empty content specially (Qwen omits an empty assistant content): such messages
        # have no bytes to find, so render them as they are and look for the others only.
        if not any(m["content"] == "" for m in msgs):
            raise
        return rendered, _locate(view, side, msgs, rendered, marked=[m["content"] != "" for m in msgs])


def _locate(view: TokenizerView, side: str | None, msgs: list[dict], rendered: str,
            marked: list[bool]) -> list[ChatRegion]:
    """Render once more with a unique marker as each (marked) content: the text between markers is template
    text, which must appear verbatim in ``rendered``; what lies between is each message's rendered content."""
    markers = [f"\u2063xtok{k}\u2063" if marked[k] else None for k in range(len(msgs))]
    marked_text = _apply_template(
        view, [{**m, "content": markers[k]} if markers[k] else m for k, m in enumerate(msgs)], side, msgs)
    # Where each marker sits in the marked rendering (-1: the template drops that message).
    found, src = [], 0
    for marker in markers:
        at = marked_text.find(marker, src) if marker else -1
        found.append(at)
        if at >= 0:
            src = at + len(marker)
    who = _who(view, side)
    regions: list[ChatRegion] = []
    src, out = 0, 0  # cursors in `marked_text` and in `rendered`
    for k, at in enumerate(found):
        if at < 0:
            regions.append(ChatRegion(out, 0, 0, "kept" if markers[k] is None else "dropped"))
            continue
        template = marked_text[src:at]
        if not rendered.startswith(template, out):
            raise ValueError(f"{who}: its chat template renders differently around message {k}; cannot align it")
        out += len(template)
        src = at + len(markers[k])
        content = msgs[k]["content"]
        lead = len(content) - len(content.lstrip())
        for variant, offset in ((content, 0), (content.strip(), lead), (content.rstrip(), 0), (content.lstrip(), lead)):
            if rendered.startswith(variant, out):
                regions.append(ChatRegion(out, len(variant), offset, "kept"))
                out += len(variant)
                break
        else:
            # Rewritten beyond trimming: skip to where the template text after this message resumes.
            nxt = next((a for a in found[k + 1:] if a >= 0), len(marked_text))
            piece = marked_text[src:nxt]
            if nxt == len(marked_text):
                resume = len(rendered) - len(piece) if rendered.endswith(piece) else -1
            else:
                resume = rendered.find(piece, out) if piece else -1
            if resume < out:
                raise ValueError(
                    f"{who}: its chat template rewrites the content of message {k} ({msgs[k]['role']!r}) beyond "
                    "trimming, and the text after it cannot be located; xtok_kd can only align content that the "
                    "template keeps as is or trimmed"
                )
            regions.append(ChatRegion(out, resume - out, 0, "rewritten"))
            out = resume
    if rendered[out:] != marked_text[src:]:
        raise ValueError(f"{who}: its chat template renders the end of the conversation differently; cannot align")
    return regions


@dataclass(frozen=True)
class EncodedExample:
    """One side of one example: ids and spans in the example's byte coordinates (content coordinates for chats).

    Attributes:
        ids: ``(n,)`` int64, before truncation.
        spans: ``(n, 2)`` int64; empty for tokens that are not content (BOS/EOS, template text, tokens straddling
            template and content).
        seam_tokens: tokens straddling a content edge (template/content): given an empty span, in no chunk.
        statuses: per message (chat examples), how this side's template renders it (:class:`ChatRegion`).
        label_at: ``(n,)`` int64 content byte offset that decides whether the token gets a label (the start of
            the content it covers; for a seam token, the first content byte it overlaps), -1 for tokens that hold
            no content. None: the start of each non-empty span.
    """

    ids: np.ndarray
    spans: np.ndarray
    seam_tokens: int = 0
    statuses: tuple[RegionStatus, ...] = ()
    label_at: np.ndarray | None = None

    def label_offsets(self) -> np.ndarray:
        """:attr:`label_at`, or derived from the spans when not given."""
        if self.label_at is not None:
            return self.label_at
        return np.where(self.spans[:, 1] > self.spans[:, 0], self.spans[:, 0], -1)


class EncodedPair(NamedTuple):
    """Both sides of one example (:meth:`CrossTokenizerCollator.encode_example`).

    Attributes:
        teacher / student: each side's ids and content-coordinate spans.
        loss_ranges: ``(R, 2)`` content byte ranges that count for the loss (``loss_on``).
        content_ranges: ``(Q, 2)`` content byte ranges of the example's text: the text, or each message at
            least one side renders (the separators between messages are not content).
        one_sided: ``(message index, role, side lacking it, how)`` for each message only one side renders.
    """

    teacher: EncodedExample
    student: EncodedExample
    loss_ranges: np.ndarray
    content_ranges: np.ndarray
    one_sided: tuple[tuple[int, str, str, str], ...] = ()


def _encode_text(view: TokenizerView, text: str) -> EncodedExample:
    enc = view.encode(text)  # an empty text: only what the tokenizer adds (BOS/EOS), no content
    return EncodedExample(enc.ids, enc.spans.reshape(-1, 2))


def _encode_chat(view: TokenizerView, messages: Sequence[Mapping[str, Any]], dest: np.ndarray,
                 side: str) -> EncodedExample:
    """Encode the rendered chat and move spans into content coordinates (message k starts at ``dest[k]``).

    A token is content iff it lies inside one message's rendered content; one that crosses a content edge (part
    template, part content) gets an empty span and is counted in ``seam_tokens``."""
    rendered, regions = render_chat(view, messages, side=side)
    enc = view.encode(rendered, add_special_tokens=False)
    statuses = tuple(r.status for r in regions)
    use = [k for k, r in enumerate(regions) if r.status == "kept" and r.char_len > 0]
    spans = np.zeros_like(enc.spans)
    label_at = np.full(enc.ids.shape[0], -1, dtype=np.int64)
    seam = 0
    if use:
        cb = char_to_byte_offsets(rendered)
        r_start = cb[[regions[k].char_start for k in use]]
        r_end = cb[[regions[k].char_start + regions[k].char_len for k in use]]
        lead = np.array([len(messages[k]["content"][: regions[k].content_offset].encode("utf-8")) for k in use],
                        dtype=np.int64)
        shift = dest[use] + lead - r_start
        a, b = enc.spans[:, 0], enc.spans[:, 1]
        content = b > a
        # A token crosses an edge when some region start or end lies strictly inside its span.
        edges = np.stack([r_start, r_end], axis=1).ravel()
        crosses = np.searchsorted(edges, b, side="left") > np.searchsorted(edges, a, side="right")
        r = np.searchsorted(r_start, a, side="right") - 1
        rr = np.maximum(r, 0)
        inside = content & ~crosses & (r >= 0) & (a < r_end[rr])
        seam_mask = content & crosses
        seam = int(seam_mask.sum())
        spans[inside] = enc.spans[inside] + shift[rr[inside], None]
        label_at[inside] = spans[inside, 0]
        # A seam token is still the student's own text: it is labelled by the first content byte it overlaps.
        q = np.searchsorted(r_start, b, side="left") - 1
        qq = np.maximum(q, 0)
        overlaps = seam_mask & (q >= 0) & (r_end[qq] > a)
        label_at[overlaps] = np.maximum(a[overlaps], r_start[qq[overlaps]]) + shift[qq[overlaps]]
        # Template tokens get an empty span at the end of the content before them (keeps spans monotone).
        run = np.maximum.accumulate(np.where(inside, spans[:, 1], 0))
        spans[~inside] = run[~inside, None]
    return EncodedExample(enc.ids, spans, seam, statuses, label_at)


class CrossTokenizerCollator:
    """Collate examples into padded teacher and student inputs plus their :class:`~xtok_kd.Alignment`.

    Args:
        teacher / student: anything :func:`~xtok_kd.load_tokenizer` accepts.
        max_length: truncate both sides to this many tokens (overridden per side by the two below). Bytes that
            one side loses to truncation are reported in ``alignment.unaligned_bytes``, bytes both sides lose in
            ``alignment.truncated_bytes``; never paired.
        teacher_max_length / student_max_length: per-side limits.
        loss_on: ``"all"`` content, or ``"assistant"`` content only (chat examples; a text example counts all
            of its text, a prompt/completion example its completion): sets ``alignment.chunk_loss_mask`` and the
            student labels.
        pad_to_multiple_of: round padded lengths up.

    Returns (from ``__call__``) a dict:

    * ``teacher_input_ids``, ``teacher_attention_mask``, ``student_input_ids``, ``student_attention_mask``:
      ``(B, L)`` int64 tensors.
    * ``student_labels``: ``(B, Ls)``, the student's own next-token labels. A student token gets its id iff it is
      content (a non-empty span in content coordinates) inside a loss range of its sample (``loss_on="all"``:
      all content; ``"assistant"``: assistant message content; a prompt/completion example: the tokens starting
      in its completion), else -100. The rule reads the student's text
      and ``loss_on`` only, never the teacher: student tokens the teacher cannot pair (teacher truncated
      earlier, a message only the student's template renders) keep their labels. Tokens that are not content
      are never labelled: BOS/EOS the tokenizer adds, padding, and every chat-template token, including the
      end-of-turn marker after assistant content (``<|im_end|>``, ``<|eot_id|>``, ``</s>``). Add those yourself
      if the student must learn to stop. A token straddling template and content (Mistral's ``▁It`` after
      ``[/INST]``) is in no chunk but keeps its label when the content it overlaps counts: it is the student's
      own text.
    * ``alignment``: the :class:`~xtok_kd.Alignment`; ``chunk_loss_mask`` marks chunks starting inside a loss
      range. ``covered_bytes`` counts content bytes only (the separators between messages are not content), so
      a perfectly aligned chat reports ``aligned_share == 1.0``; ``truncated_bytes`` counts content bytes both
      sides lost to truncation; ``teacher_fingerprint`` / ``student_fingerprint`` are set.
    * ``seam_tokens``: tokens straddling template and content (in no chunk; labelled by the content they hold).
    * ``dropped_messages``: messages only one side's template renders (dropped or rewritten by the other;
      unaligned, out of the distillation loss; a warning names them).
    * ``truncated_examples``: examples of which one side kept no content at all after truncation (a warning
      names them; their bytes are in ``unaligned_bytes`` or ``truncated_bytes``).
    * ``teacher_fingerprint`` / ``student_fingerprint``: the tokenizers' fingerprints (str).
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
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
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

    def encode_example(self, example: Mapping[str, Any]) -> EncodedPair:
        """Both sides of one example in content coordinates, with its loss and content byte ranges."""
        forms = [isinstance(example, Mapping) and key in example for key in ("text", "messages", "prompt")]
        paired = isinstance(example, Mapping) and ("prompt" in example) == ("completion" in example)
        if sum(forms) != 1 or not paired:
            keys = list(example) if isinstance(example, Mapping) else type(example).__name__
            raise ValueError(f"each example needs exactly one of 'text' or 'messages', or both 'prompt' and "
                             f"'completion' (the loss then covers the completion only); got {keys}")
        if "prompt" in example:
            prompt, completion = example["prompt"], example["completion"]
            for name, value in (("prompt", prompt), ("completion", completion)):
                if not isinstance(value, str):
                    raise ValueError(f"{name!r} must be a str, got {type(value).__name__}")  # noqa: TRY004
            text = prompt + completion
            teacher, student = _encode_text(self.teacher, text), _encode_text(self.student, text)
            start, end = len(prompt.encode("utf-8")), len(text.encode("utf-8"))
            return EncodedPair(teacher, student, np.array([[start, end]], dtype=np.int64),
                               np.array([[0, end]], dtype=np.int64))
        if "text" in example:
            text = example["text"]
            if not isinstance(text, str):
                raise ValueError(f"'text' must be a str, got {type(text).__name__}")
            teacher, student = _encode_text(self.teacher, text), _encode_text(self.student, text)
            whole = np.array([[0, len(text.encode("utf-8"))]], dtype=np.int64)
            return EncodedPair(teacher, student, whole, whole)
        messages = example["messages"]
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(f"'messages' must be a list of {{'role', 'content'}} mappings, got "
                             f"{type(messages).__name__}")
        sizes = np.array([len(m["content"].encode("utf-8")) if isinstance(m, Mapping) and isinstance(
            m.get("content"), str) else 0 for m in messages], dtype=np.int64)
        dest = np.concatenate(([0], np.cumsum(sizes + 1)[:-1])).astype(np.int64)
        teacher = _encode_chat(self.teacher, messages, dest, "teacher")
        student = _encode_chat(self.student, messages, dest, "student")
        present, one_sided = [], []
        for k, (ts, ss) in enumerate(zip(teacher.statuses, student.statuses)):
            if ts == "kept" or ss == "kept":
                present.append(k)
            if (ts == "kept") != (ss == "kept"):
                lacking, how = ("teacher", ts) if ss == "kept" else ("student", ss)
                one_sided.append((k, messages[k]["role"], lacking, how))
        content_ranges = np.array([[dest[k], dest[k] + sizes[k]] for k in present], dtype=np.int64).reshape(-1, 2)
        counted = [k for k in present if self.loss_on == "all" or messages[k]["role"] == "assistant"]
        loss_ranges = np.array([[dest[k], dest[k] + sizes[k]] for k in counted], dtype=np.int64).reshape(-1, 2)
        return EncodedPair(teacher, student, loss_ranges, content_ranges, tuple(one_sided))

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("CrossTokenizerCollator got an empty batch")
        encoded = []
        for i, ex in enumerate(examples):
            try:
                encoded.append(self.encode_example(ex))
            except ValueError as err:
                raise ValueError(f"example {i}: {err}") from err
        t_ids, t_spans, t_mask, t_kept = self._pad([e.teacher for e in encoded], self.teacher,
                                                   self.teacher_max_length)
        s_ids, s_spans, s_mask, s_kept = self._pad([e.student for e in encoded], self.student,
                                                   self.student_max_length)
        alignment = align_spans(t_spans, s_spans)
        batch = len(encoded)

        # Byte accounting in content bytes (the separators between messages are not content): covered = content
        # before the furthest truncation point of the two sides; truncated = content past it, which both lost.
        covered = np.zeros(batch, dtype=np.int64)
        total = np.zeros(batch, dtype=np.int64)
        for b, e in enumerate(encoded):
            r = e.content_ranges
            end = int(r[-1, 1]) if r.shape[0] else 0
            hi = max(_truncated_at(e.teacher, t_kept[b], end), _truncated_at(e.student, s_kept[b], end))
            total[b] = int((r[:, 1] - r[:, 0]).sum())
            covered[b] = int(np.clip(np.minimum(r[:, 1], hi) - r[:, 0], 0, None).sum())
        aligned = np.zeros(batch, dtype=np.int64)
        np.add.at(aligned, alignment.chunk_sample, alignment.chunk_bytes[:, 1] - alignment.chunk_bytes[:, 0])

        # Chunks that count: those starting inside a loss range of their sample.
        counts = np.zeros(alignment.num_chunks, dtype=bool)
        labels = np.full_like(s_ids, -100)
        for b, e in enumerate(encoded):
            sel = np.flatnonzero(alignment.chunk_sample == b)
            counts[sel] = _in_ranges(alignment.chunk_bytes[sel, 0], e.loss_ranges)
            # Student labels: the student's own content tokens inside a loss range (the teacher plays no part).
            n = s_kept[b]
            at = e.student.label_offsets()[:n]
            label = (at >= 0) & _in_ranges(at, e.loss_ranges)
            labels[b, :n] = np.where(label, s_ids[b, :n], -100)
        alignment = replace(
            alignment.with_loss_mask(counts),
            covered_bytes=covered,
            unaligned_bytes=covered - aligned,
            truncated_bytes=total - covered,
            teacher_fingerprint=self.teacher.fingerprint,
            student_fingerprint=self.student.fingerprint,
        )
        dropped = self._warn_one_sided(encoded)
        truncated = self._warn_truncated(encoded, t_kept, s_kept, total)
        return {
            "teacher_input_ids": torch.as_tensor(t_ids),
            "teacher_attention_mask": torch.as_tensor(t_mask),
            "student_input_ids": torch.as_tensor(s_ids),
            "student_attention_mask": torch.as_tensor(s_mask),
            "student_labels": torch.as_tensor(labels),
            "alignment": alignment,
            "seam_tokens": sum(e.teacher.seam_tokens + e.student.seam_tokens for e in encoded),
            "dropped_messages": dropped,
            "truncated_examples": truncated,
            "teacher_fingerprint": self.teacher.fingerprint,
            "student_fingerprint": self.student.fingerprint,
        }

    def _warn_one_sided(self, encoded: list[EncodedPair]) -> int:
        found = [(b, *m) for b, e in enumerate(encoded) for m in e.one_sided]
        if found:
            names = {"teacher": self.teacher.name, "student": self.student.name}
            what = "; ".join(
                f"example {b} message {k} (role {role!r}) {how} by the {side}'s template ({names[side]!r})"
                for b, k, role, side, how in found[:5]
            ) + ("; ..." if len(found) > 5 else "")
            warnings.warn(
                f"{len(found)} message(s) are rendered by one side's chat template only: {what}. They are left out "
                "of the distillation loss (their bytes are reported in alignment.unaligned_bytes and counted in "
                "batch['dropped_messages']), and the two models see different conversations around them. Fix: "
                "use roles both templates render as content (usually 'user'/'assistant'/'system'), or remove "
                "such turns",
                stacklevel=3,
            )
        return len(found)

    def _warn_truncated(self, encoded: list[EncodedPair], t_kept: list[int], s_kept: list[int],
                        total: np.ndarray) -> int:
        lost = []
        for b, e in enumerate(encoded):
            for side, enc, n, limit in (("teacher", e.teacher, t_kept[b], self.teacher_max_length),
                                        ("student", e.student, s_kept[b], self.student_max_length)):
                content = enc.spans[:, 1] > enc.spans[:, 0]
                if content.any() and not content[:n].any():
                    lost.append((b, side, limit))
        if lost:
            what = "; ".join(f"example {b}: the {side} kept none of its content within max_length={limit}"
                             for b, side, limit in lost[:5]) + ("; ..." if len(lost) > 5 else "")
            warnings.warn(
                f"{what}. Only BOS/template tokens survive truncation, so these examples are not distilled; their "
                f"content bytes are in alignment.unaligned_bytes / alignment.truncated_bytes "
                f"({int(total.sum())} content bytes in the batch). Fix: raise max_length (or the per-side "
                "teacher_max_length / student_max_length), or shorten the chat template's system prompt",
                stacklevel=3,
            )
        return len({b for b, *_ in lost})

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
        return ids, spans, mask, lengths


def _truncated_at(side: EncodedExample, kept: int, end: int) -> int:
    """Content byte where truncation cut ``side`` (the start of its first content token past ``kept``), or
    ``end`` when no content token was cut. Bytes before it that the side does not cover (a special token typed
    in the text, a template seam) are uncovered, not truncated."""
    rest = side.spans[kept:]
    cut = np.flatnonzero(rest[:, 1] > rest[:, 0])
    return int(rest[cut[0], 0]) if cut.shape[0] else end


def _in_ranges(starts: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Which byte offsets lie inside one of the sorted, disjoint ``[start, end)`` ``ranges``."""
    if not ranges.shape[0]:
        return np.zeros(starts.shape, dtype=bool)
    k = np.searchsorted(ranges[:, 0], starts, side="right") - 1
    return (k >= 0) & (starts < ranges[np.maximum(k, 0), 1])
