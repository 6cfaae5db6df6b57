"""TokenizerView: one tokenizer seen as bytes.

Every tokenizer family stores its vocabulary differently: byte-level BPE (GPT-2, Qwen, Llama 3) spells bytes
with a printable-unicode alphabet (``Ġ`` is a space), SentencePiece (Mistral, Llama 2) spells a space as ``▁``
and falls back to ``<0xNN>`` pieces for bytes outside its vocabulary. A :class:`TokenizerView` hides this:

* :meth:`TokenizerView.token_bytes` gives the *canonical bytes* of every vocabulary entry, the bytes the entry
  contributes to decoded text (a SentencePiece ``▁the`` is ``b" the"``, a byte-level ``Ġthe`` is too);
* :meth:`TokenizerView.encode` gives ids and the exact ``[start, end)`` byte span of the ORIGINAL text that each
  token covers, even where a byte-level token holds half of a multi-byte character, where a normaliser rewrites
  the text (NFC) or where SentencePiece prepends a space that the text does not have;
* :attr:`TokenizerView.fingerprint` identifies the tokenizer's behaviour, so saved tables can refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["Encoding", "TokenizerView", "load_tokenizer", "char_to_byte_offsets"]


def _byte_level_alphabet() -> dict[str, int]:
    """The reversible byte <-> printable-character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


def char_to_byte_offsets(text: str) -> np.ndarray:
    """Byte offset of every character boundary of ``text`` in its UTF-8 encoding.

    Returns an int64 array of length ``len(text) + 1``: entry ``k`` is the byte offset where character ``k`` starts.
    """
    codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    offsets = np.zeros(len(codepoints) + 1, dtype=np.int64)
    np.cumsum(widths, out=offsets[1:])
    return offsets


@dataclass(frozen=True)
class Encoding:
    """Token ids of one text with the byte span of the original text that each token covers.

    Attributes:
        ids: ``(n,)`` int64 token ids, including any BOS/EOS the tokenizer adds.
        spans: ``(n, 2)`` int64 ``[start, end)`` offsets into ``text.encode("utf-8")``. Tokens that the text does
            not contain (BOS/EOS added by the tokenizer, a SentencePiece prefix space) have an empty span
            (``start == end``). Non-empty spans are disjoint and increasing.
        num_bytes: length of the UTF-8 text.
        uncovered_bytes: bytes of the text that no token covers (0 for a lossless tokenizer; non-zero where a
            normaliser deleted characters). Never silently ignored: the alignment reports them too.
        unknown_tokens: number of ``<unk>`` tokens (a lossy tokenization: the ids no longer spell the text).
        special_in_text: special tokens that the tokenizer found written in the text (``"<|im_end|>"`` typed in
            a document). They are control tokens, not text: their spans are empty and their bytes count as
            uncovered, so they never end up paired with the other side's ordinary tokens.
    """

    ids: np.ndarray
    spans: np.ndarray
    num_bytes: int
    uncovered_bytes: int = 0
    unknown_tokens: int = 0
    special_in_text: int = 0

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _fix_spans(byte_starts: np.ndarray, byte_ends: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn offset-derived byte ranges into exact, disjoint spans.

    Tokenizer offsets are character offsets: tokens that share one character (a 4-byte emoji split over two
    byte-level tokens, a SentencePiece byte-fallback run, a prepended ``▁``) report overlapping ranges. Tokens are
    grouped into *clusters* of overlapping ranges; inside a cluster ``[S, E)`` the tokens' canonical byte lengths
    are laid end to end. Bytes in excess of ``E - S`` sit at the front (a prefix space that the text does not
    contain) and are cut off there; a deficit (a normaliser that shortened the text) is absorbed by the cluster's
    last token. Vectorised: no Python loop over tokens.
    """
    n = byte_starts.shape[0]
    if n == 0:
        return byte_starts, byte_ends
    running_end = np.maximum.accumulate(byte_ends)
    new_cluster = np.ones(n, dtype=bool)
    new_cluster[1:] = byte_starts[1:] >= running_end[:-1]
    first = np.flatnonzero(new_cluster)
    cluster = np.cumsum(new_cluster) - 1
    cluster_start = byte_starts[first]
    cluster_end = np.maximum.reduceat(byte_ends, first)
    cum = np.cumsum(lengths)
    before = np.concatenate(([0], cum[first[1:] - 1])) if first.shape[0] > 1 else np.zeros(1, dtype=np.int64)
    cum_incl = cum - before[cluster]
    total = np.add.reduceat(lengths, first)
    excess = np.maximum(total - (cluster_end - cluster_start), 0)
    s0 = cluster_start[cluster]
    e0 = cluster_end[cluster]
    starts = np.clip(s0 + cum_incl - lengths - excess[cluster], s0, e0)
    ends = np.clip(s0 + cum_incl - excess[cluster], s0, e0)
    last = np.append(first[1:] - 1, n - 1)
    ends[last] = cluster_end
    return starts, ends


class TokenizerView:
    """A tokenizer seen as canonical bytes and byte spans. Build one with :func:`load_tokenizer`.

    Attributes:
        name: where the tokenizer came from (path or hub id), for reports and table metadata.
        hf: the ``transformers`` tokenizer (chat templates, special-token names).
        backend: the ``tokenizers.Tokenizer`` doing the work.
        family: ``"byte_level"`` or ``"sentencepiece"`` (how vocabulary strings spell bytes).
        vocab_size: number of ids, added tokens included (``len(hf)``).
    """

    def __init__(self, hf_tokenizer: Any, *, name: str | None = None) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"{type(hf_tokenizer).__name__} has no fast backend, so it cannot report token offsets; "
                "load the fast tokenizer instead (AutoTokenizer.from_pretrained(..., use_fast=True)) or pass a "
                "folder that contains tokenizer.json."
            )
        self.hf = hf_tokenizer
        self.backend = backend
        self.name = name or getattr(hf_tokenizer, "name_or_path", "") or type(hf_tokenizer).__name__
        self.vocab_size = len(hf_tokenizer)
        self._config = json.loads(backend.to_str())
        self.family = self._detect_family()

    def __repr__(self) -> str:
        return f"TokenizerView({self.name!r}, family={self.family!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ vocabulary
    def _detect_family(self) -> str:
        parts = json.dumps([self._config.get("pre_tokenizer"), self._config.get("decoder")])
        if '"ByteLevel"' in parts:
            return "byte_level"
        return "sentencepiece"

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens: added tokens flagged special, plus the configured bos/eos/pad/unk."""
        ids = {int(i) for i, tok in self.hf.added_tokens_decoder.items() if tok.special}
        for tid in (self.hf.bos_token_id, self.hf.eos_token_id, self.hf.pad_token_id, self.hf.unk_token_id):
            if tid is not None:
                ids.add(int(tid))
        return frozenset(ids)

    @cached_property
    def _vocab_bytes(self) -> list[bytes]:
        vocab = self.backend.get_vocab(with_added_tokens=True)
        table: list[bytes] = [b""] * self.vocab_size
        added = {int(i): tok.content for i, tok in self.hf.added_tokens_decoder.items()}
        byte_fallback = bool(self._config.get("model", {}).get("byte_fallback"))
        for piece, tid in vocab.items():
            if tid >= self.vocab_size:
                continue
            if tid in added:
                table[tid] = added[tid].encode("utf-8")
            elif self.family == "byte_level":
                try:
                    table[tid] = bytes(_BYTE_LEVEL[c] for c in piece)
                except KeyError:  # a piece outside the byte alphabet: take its text
                    table[tid] = piece.encode("utf-8")
            elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table[tid] = bytes([int(piece[3:5], 16)])
            else:
                table[tid] = piece.replace("\u2581", " ").encode("utf-8")
        return table

    def token_bytes(self, token_id: int) -> bytes:
        """Canonical bytes of vocabulary entry ``token_id`` (for special tokens: the UTF-8 of their text)."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside this vocabulary of {self.vocab_size} ids ({self.name})")
        return self._vocab_bytes[int(token_id)]

    def all_token_bytes(self) -> list[bytes]:
        """Canonical bytes of every id, index = id (a shared list: do not modify)."""
        return self._vocab_bytes

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """``(vocab_size,)`` int64 canonical byte length of each id."""
        return np.fromiter((len(b) for b in self._vocab_bytes), dtype=np.int64, count=self.vocab_size)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of everything that decides ids and bytes: model, normaliser, pre-tokeniser,
        decoder, added tokens. Two views with equal fingerprints tokenize every text identically."""
        keys = ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens")
        blob = json.dumps({k: self._config.get(k) for k in keys}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    @cached_property
    def special_mask(self) -> np.ndarray:
        """``(vocab_size,)`` bool, True for :attr:`special_ids`."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[[i for i in self.special_ids if i < self.vocab_size]] = True
        return mask

    @property
    def unk_id(self) -> int | None:
        return self.hf.unk_token_id

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, *, add_special_tokens: bool = True) -> Encoding:
        """Token ids of ``text`` and the exact byte span of the original text that each one covers.

        Args:
            text: the text; must be a non-empty ``str``.
            add_special_tokens: add the BOS/EOS that the tokenizer's post-processor adds (as the model sees it).

        Returns:
            :class:`Encoding` with ``ids (n,)`` and ``spans (n, 2)``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if not text:
            raise ValueError("encode() got an empty text: there is nothing to tokenize or align")
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return self._encoding_from(text, enc)

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[Encoding]:
        """:meth:`encode` for many texts, tokenized in parallel by the backend."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ValueError(f"encode_batch(): text {i} is {text!r}; every text must be a non-empty str")
        encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [self._encoding_from(t, e) for t, e in zip(texts, encs)]

    @cached_property
    def _byte_exact_mode(self) -> str | None:
        """When the token bytes spell the text exactly, so spans are running sums of token lengths:
        ``"plain"`` (byte-level, no normaliser), ``"nfc"`` (byte-level with NFC, for NFC text),
        ``"prefix_space"`` (SentencePiece that prepends ``▁`` and spells spaces ``▁``, with byte fallback)."""
        norm = self._config.get("normalizer")
        if self.family == "byte_level":
            if norm is None:
                return "plain"
            if norm == {"type": "NFC"}:
                return "nfc"
            return None
        steps = norm.get("normalizers", []) if isinstance(norm, dict) and norm.get("type") == "Sequence" else []
        types = [(st.get("type"), st.get("prepend"), st.get("content")) for st in steps]
        if (types == [("Prepend", "\u2581", None), ("Replace", None, "\u2581")]
                and self._config.get("pre_tokenizer") is None
                and self._config.get("model", {}).get("byte_fallback")):
            return "prefix_space"
        return None

    def _fast_spans(self, text: str, ids: np.ndarray) -> np.ndarray | None:
        """Spans from cumulative canonical byte lengths, or None when that is not provably exact for ``text``.

        Exactness: with these pipelines every byte of the text is spelled by exactly one token, in order, so the
        running sum of token lengths IS the byte offset. The total is checked against the text's length (a
        special token written in the text, or any surprise, sends the text down the offsets path)."""
        mode = self._byte_exact_mode
        if mode is None or (mode == "nfc" and not unicodedata.is_normalized("NFC", text)):
            return None
        if ids.shape[0] == 0 or ids.max() >= self.vocab_size:
            return None
        lengths = np.where(self.special_mask[ids], 0, self.token_lengths[ids])
        ends = np.cumsum(lengths)
        phantom = 1 if mode == "prefix_space" else 0
        if int(ends[-1]) != len(text.encode("utf-8")) + phantom:
            return None
        spans = np.empty((ids.shape[0], 2), dtype=np.int64)
        if phantom:
            ends -= 1
            np.maximum(ends, 0, out=ends)
        spans[:, 1] = ends
        np.subtract(ends, lengths, out=spans[:, 0])
        if phantom:
            np.maximum(spans[:, 0], 0, out=spans[:, 0])
        return spans

    def _encoding_from(self, text: str, enc: Any) -> Encoding:
        ids = np.array(enc.ids, dtype=np.int64)
        fast = self._fast_spans(text, ids)
        if fast is not None:
            return Encoding(ids=ids, spans=fast, num_bytes=int(fast[-1, 1]) if fast.shape[0] else 0)
        return self._encoding_from_offsets(text, enc, ids)

    def _encoding_from_offsets(self, text: str, enc: Any, ids: np.ndarray) -> Encoding:
        n = ids.shape[0]
        char_offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(n, 2)
        cb = char_to_byte_offsets(text)
        num_bytes = int(cb[-1])
        added = np.asarray(enc.special_tokens_mask, dtype=bool)  # tokens the post-processor added (BOS/EOS)
        byte_starts = cb[char_offsets[:, 0]]
        byte_ends = cb[char_offsets[:, 1]]
        in_range = ids < self.vocab_size
        special = self.special_mask[np.where(in_range, ids, 0)] & in_range
        if self.unk_id is not None:
            special &= ids != self.unk_id  # <unk> stands for text: it keeps its span (and is counted)
        content = ~added & ~special & (byte_ends > byte_starts)
        special_in_text = int((~added & special & (byte_ends > byte_starts)).sum())
        if not content.any():
            what = "special tokens only" if special_in_text else "no text the tokenizer keeps"
            raise ValueError(
                f"{self.name}: the text {text[:60]!r} holds {what}; there is nothing to align. Pass the content "
                "without control tokens (for chats use CrossTokenizerCollator with {'messages': [...]})"
            )
        spans = np.empty((n, 2), dtype=np.int64)
        idx = np.flatnonzero(content)
        spans[idx, 0], spans[idx, 1] = _fix_spans(byte_starts[idx], byte_ends[idx], self.token_lengths[ids[idx]])
        # Empty spans sit where the next content token starts (or at the end), so spans stay monotone.
        empty = np.flatnonzero(~content)
        if empty.shape[0]:
            marks = np.full(n + 1, num_bytes, dtype=np.int64)
            marks[idx] = spans[idx, 0]
            next_start = np.minimum.accumulate(marks[::-1])[::-1]
            spans[empty, 0] = next_start[empty]
            spans[empty, 1] = next_start[empty]
        self._absorb_gaps(text, spans, idx, num_bytes, byte_starts[~added & special & (byte_ends > byte_starts)])
        covered = int((spans[:, 1] - spans[:, 0]).sum())
        unk = self.unk_id
        unknown = int((ids == unk).sum()) if unk is not None else 0
        return Encoding(ids=ids, spans=spans, num_bytes=num_bytes, uncovered_bytes=num_bytes - covered,
                        unknown_tokens=unknown, special_in_text=special_in_text)

    def _absorb_gaps(self, text: str, spans: np.ndarray, idx: np.ndarray, num_bytes: int,
                     special_starts: np.ndarray) -> None:
        """Give uncovered bytes that the normaliser merged into a neighbour (NFC folds ``e`` + U+0301 into one
        character whose offsets cover the ``e`` only) to the token before them (or after, at the start).
        Bytes the normaliser deletes outright, and special tokens written in the text, stay uncovered and are
        reported. Gaps are rare: the loop runs over gaps, not tokens."""
        if not idx.shape[0]:
            return
        starts, ends = spans[idx, 0], spans[idx, 1]
        gap_after = np.flatnonzero(np.append(starts[1:], num_bytes) > ends)
        lead = int(starts[0])
        if not gap_after.shape[0] and lead == 0:
            return
        data = text.encode("utf-8")
        normalizer = self.backend.normalizer

        def kept(a: int, b: int) -> bool:
            if ((special_starts >= a) & (special_starts < b)).any():
                return False
            piece = data[a:b].decode("utf-8", errors="replace")
            if piece.isspace():  # whitespace a pre-tokenizer drops is not part of any token
                return False
            return bool(normalizer.normalize_str(piece) if normalizer is not None else piece)

        for g in gap_after:
            a, b = int(ends[g]), int(starts[g + 1]) if g + 1 < starts.shape[0] else num_bytes
            if kept(a, b):
                spans[idx[g], 1] = b
        if lead and kept(0, lead):
            spans[idx[0], 0] = 0
        # Empty spans placed inside an absorbed gap move with it.
        run = np.maximum.accumulate(np.where(spans[:, 1] > spans[:, 0], spans[:, 1], 0))
        empty = spans[:, 1] == spans[:, 0]
        spans[empty] = np.maximum(spans[empty], run[empty, None])

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))


def load_tokenizer(tokenizer: Any, **kwargs: Any) -> TokenizerView:
    """A :class:`TokenizerView` from a local folder, a hub id, a ``transformers`` tokenizer or a view.

    Args:
        tokenizer: a folder containing ``tokenizer.json`` (and ``tokenizer_config.json``), the name of an
            embedded tokenizer (``"qwen2.5"``, ``"mistral"``, ``"gpt2"``; see ``xtok_kd/assets``), a Hugging Face
            hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"`` (downloaded by ``transformers``), a fast
            ``transformers`` tokenizer object, or a :class:`TokenizerView` (returned as is).
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (``revision=``, ``token=``, ...).
    """
    if isinstance(tokenizer, TokenizerView):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        name = os.fspath(tokenizer)
        source = name
        if not os.path.exists(name):
            from .assets import embedded_tokenizer

            source = str(embedded_tokenizer(name) or name)
        try:
            hf = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            hint = "a folder with tokenizer.json" if os.path.sep in name or os.path.exists(name) else "a hub id"
            raise ValueError(f"could not load tokenizer {name!r} ({hint}): {err}") from err
        return TokenizerView(hf, name=name)
    if hasattr(tokenizer, "backend_tokenizer") or hasattr(tokenizer, "encode"):
        return TokenizerView(tokenizer)
    raise TypeError(
        f"load_tokenizer() takes a path, a hub id, a transformers tokenizer or a TokenizerView; got "
        f"{type(tokenizer).__name__}"
    )
