"""Projection: every source token's bytes re-tokenised by the target tokenizer.

If a model predicts source token ``x`` next, the other model's next token is the first token of ``x``'s text. The
projection therefore stores, for each source id, the full decomposition of its canonical bytes into target ids
(ragged, CSR style) and its first piece. Every decomposition is verified: the concatenated canonical bytes of the
pieces equal the source token's bytes. Where the target tokenizer's own output does not (a half UTF-8 character
that cannot travel through a ``str``, a normaliser that rewrites the text, a special token in the output), the
bytes are split by greedy longest match on the target vocabulary's non-special entries instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from ..tokenizer import TokenizerView
from .exact import is_byte_piece

__all__ = ["Projection", "project"]




@dataclass(frozen=True)
class Projection:
    """Decomposition of every source id into target ids.

    Attributes:
        first: ``(Vs,)`` int64 first target id of each source token (-1 where unmapped).
        weight: ``(Vs,)`` float32, 1.0 where mapped, 0.0 where not.
        offsets: ``(Vs + 1,)`` int64 CSR offsets into ``pieces``; source ``i`` owns ``pieces[offsets[i]:offsets[i+1]]``.
        pieces: ``(N,)`` int64 target ids.
        fallback: number of source tokens split by greedy longest match instead of the target tokenizer.
        undecomposable: number of non-special source tokens whose bytes the target vocabulary cannot spell.
    """

    first: np.ndarray
    weight: np.ndarray
    offsets: np.ndarray
    pieces: np.ndarray
    fallback: int
    undecomposable: int


def _plain_backend(view: TokenizerView) -> Any:
    """The target's backend, or a copy of it that adds no SentencePiece / ByteLevel prefix space.

    Inside a text a token's bytes are not preceded by a dummy ``▁``; the copy tokenizes them as they would be
    tokenized mid-text. Only tokenizers that add a prefix space are copied (copying a 150k vocabulary costs 2 s).
    """
    from tokenizers import Tokenizer

    config = json.loads(view.backend.to_str()) if _adds_prefix(view) else None
    if config is None:
        return view.backend

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "Prepend":
                return None
            if kind == "Metaspace":
                node = dict(node, prepend_scheme="never", add_prefix_space=False)
            if kind == "ByteLevel":
                node = dict(node, add_prefix_space=False)
            out = {}
            for key, value in node.items():
                if isinstance(value, list):
                    value = [v for v in (strip(x) for x in value) if v is not None]
                elif isinstance(value, dict):
                    value = strip(value)
                out[key] = value
            return out
        return node

    for key in ("normalizer", "pre_tokenizer"):
        if config.get(key) is not None:
            config[key] = strip(config[key])
    return Tokenizer.from_str(json.dumps(config))


def _adds_prefix(view: TokenizerView) -> bool:
    """Whether the normaliser or pre-tokeniser puts a space in front of the text."""
    parts = [view.backend.normalizer, view.backend.pre_tokenizer]
    blob = json.dumps([json.loads(p.__getstate__()) if p is not None else None for p in parts])
    return (
        '"Prepend"' in blob
        or '"add_prefix_space": true' in blob
        or ('"Metaspace"' in blob and '"prepend_scheme": "never"' not in blob)
    )


class _GreedySplitter:
    """Greedy longest match of bytes on the target vocabulary's non-special entries."""

    def __init__(self, target: TokenizerView) -> None:
        special = target.special_ids
        table: dict[bytes, int] = {}
        byte_pieces = set()
        for tid, piece in enumerate(target.all_token_bytes()):
            if not piece or tid in special:
                continue
            byte_piece = len(piece) == 1 and is_byte_piece(target, tid)
            if byte_piece:
                byte_pieces.add(tid)
            old = table.get(piece)
            if old is None or (old in byte_pieces and not byte_piece):  # prefer ``▁`` over ``<0x20>``
                table[piece] = tid
        self.table = table
        self.lengths = sorted({len(p) for p in table}, reverse=True)

    def split(self, data: bytes) -> list[int] | None:
        out: list[int] = []
        pos, n = 0, len(data)
        while pos < n:
            for length in self.lengths:
                if length <= n - pos:
                    tid = self.table.get(data[pos : pos + length])
                    if tid is not None:
                        out.append(tid)
                        pos += length
                        break
            else:
                return None
        return out


def project(
    source: TokenizerView,
    target: TokenizerView,
    *,
    special_partner: dict[int, int],
    exact_partner: np.ndarray | None = None,
    progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None,
    batch_size: int = 8192,
) -> Projection:
    """Decompose every source token into target tokens.

    Args:
        source: the tokenizer whose ids are rows.
        target: the tokenizer whose ids are the pieces.
        special_partner: source special id -> its role partner in ``target`` (see :mod:`.specials`); such an id
            maps to exactly that partner. Other special ids stay unmapped (``first == -1``, no pieces).
        exact_partner: optional ``(Vs,)`` int64, the target id with the same bytes (-1 if none). Exact matches are
            pinned: their decomposition is that one id (as X-Token pins exact matches), which also spares
            re-tokenising most of the vocabulary.
        progress: optional wrapper ``progress(iterable, description, total)`` (a tqdm bar in the CLI).
        batch_size: texts per ``encode_batch`` call.

    Returns:
        :class:`Projection` with ``(Vs,)`` rows.
    """
    vs = source.vocab_size
    src_bytes = source.all_token_bytes()
    tgt_bytes = target.all_token_bytes()
    tgt_special = target.special_ids
    src_special = source.special_ids
    rows: list[list[int]] = [[] for _ in range(vs)]
    for sid, tid in special_partner.items():
        rows[sid] = [int(tid)]
    pinned = np.zeros(vs, dtype=bool)
    if exact_partner is not None:
        hit = np.flatnonzero(exact_partner >= 0)
        for i, t in zip(hit.tolist(), exact_partner[hit].tolist()):
            rows[i] = [t]
        pinned[hit] = True

    texts: list[str] = []
    text_ids: list[int] = []
    needs_fallback: list[int] = []
    for i in np.flatnonzero(~pinned).tolist():
        if i in src_special or not src_bytes[i]:
            continue
        try:
            texts.append(src_bytes[i].decode("utf-8"))
            text_ids.append(i)
        except UnicodeDecodeError:  # half a character: only bytes can spell it
            needs_fallback.append(i)

    backend = _plain_backend(target)
    starts = range(0, len(texts), batch_size)
    batches: Iterable[int] = starts
    if progress is not None:
        batches = progress(starts, f"re-tokenise {len(texts)} tokens", len(starts))
    for start in batches:
        encs = backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
        for i, enc in zip(text_ids[start : start + batch_size], encs):
            ids = enc.ids
            if ids and b"".join([tgt_bytes[t] for t in ids]) == src_bytes[i] and tgt_special.isdisjoint(ids):
                rows[i] = ids
            else:
                needs_fallback.append(i)

    undecomposable = 0
    if needs_fallback:
        splitter = _GreedySplitter(target)
        for i in needs_fallback:
            ids = splitter.split(src_bytes[i])
            if ids is None:
                undecomposable += 1
            else:
                rows[i] = ids

    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=vs)
    offsets = np.zeros(vs + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pieces = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
    first = np.full(vs, -1, dtype=np.int64)
    mapped = counts > 0
    first[mapped] = pieces[offsets[:-1][mapped]]
    weight = mapped.astype(np.float32)
    return Projection(first=first, weight=weight, offsets=offsets, pieces=pieces,
                      fallback=len(needs_fallback) - undecomposable, undecomposable=undecomposable)
