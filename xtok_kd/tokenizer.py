"""TokenizerView: one tokenizer seen as bytes.

Every tokenizer family stores its vocabulary differently: byte-level BPE (GPT-2, Qwen, Llama 3) spells bytes
with a printable-unicode alphabet (``Ġ`` is a space), SentencePiece (Mistral, Llama 2) spells a space as ``▁``
and falls back to ``<0xNN>`` pieces for bytes outside its vocabulary. A :class:`TokenizerView` hides this:

* :meth:`TokenizerView.token_bytes` gives the *canonical bytes* of every vocabulary entry, the bytes the entry
  contributes to decoded text (a SentencePiece ``▁the`` is ``b" the"``, a byte-level ``Ġthe`` is too; an added
  token matched on normalised text, such as a SentencePiece ``"▁▁"``, is spelled the same way, ``b"  "``);
* :meth:`TokenizerView.encode` gives ids and the exact ``[start, end)`` byte span of the ORIGINAL text that each
  token covers, even where a byte-level token holds half of a multi-byte character, where a normaliser rewrites
  the text (NFC) or where SentencePiece prepends a space that the text does not have; special tokens written in
  the text are control tokens with empty spans, and any ``str`` of valid Unicode encodes, the empty one included;
* :attr:`TokenizerView.fingerprint` identifies the tokenizer's behaviour, so saved tables can refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
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
_SURROGATE = re.compile("[\ud800-\udfff]")


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
            not contain (BOS/EOS added by the tokenizer, a SentencePiece prefix space) and special tokens written
            in the text have an empty span (``start == end``), placed where the next non-empty span starts (or at
            the end). Non-empty spans are disjoint and increasing. An empty text, or one holding only special
            tokens or whitespace the tokenizer drops, has no non-empty span: the alignment holds no chunk for it.
        num_bytes: length of the UTF-8 text.
        uncovered_bytes: bytes of the text that no token covers (0 for a lossless tokenizer; non-zero where a
            normaliser deleted characters, a pre-tokenizer dropped whitespace, or special tokens were written in
            the text). Never silently ignored: the alignment reports them too.
        unknown_tokens: number of genuine ``<unk>`` tokens, emitted for text the model cannot spell (a lossy
            tokenization: the ids no longer spell the text). An ``<unk>`` written literally in the text is a
            special token in the text, counted below instead.
        special_in_text: special tokens that the tokenizer found written in the text (``"<|im_end|>"`` typed in
            a document; GPT-2's ``"<|endoftext|>"`` and Mistral's ``"<unk>"`` too, although they are also unknown
            tokens). They are control tokens, not text: their spans are empty and their bytes count as uncovered,
            so they never end up paired with the other side's ordinary tokens.
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


_ASCII_SPACE = np.array([9, 10, 11, 12, 13, 28, 29, 30, 31, 32], dtype=np.uint8)  # bytes str.isspace() accepts


def _place_empty_spans(spans: np.ndarray, num_bytes: int) -> None:
    """Put every empty span where the next non-empty span starts (or at the end), so spans stay monotone."""
    empty = spans[:, 1] <= spans[:, 0]
    if not empty.any():
        return
    marks = np.where(empty, num_bytes, spans[:, 0])
    next_start = np.minimum.accumulate(marks[::-1])[::-1]
    spans[empty, 0] = next_start[empty]
    spans[empty, 1] = next_start[empty]


def _surrogate_error(text: str, what: str) -> ValueError | None:
    """The error for a text holding an unpaired surrogate (no UTF-8 bytes exist for it), or None."""
    match = _SURROGATE.search(text)
    if match is None:
        return None
    k = match.start()
    return ValueError(
        f"{what} holds an unpaired surrogate U+{ord(text[k]):04X} at character index {k} "
        f"(...{text[max(0, k - 20):k + 20]!r}...): it is not valid Unicode and has no UTF-8 bytes to tokenize. "
        "Repair the text before encoding it, e.g. text.encode('utf-8', 'replace').decode() (each surrogate "
        "becomes '?'), or text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace') when the surrogates "
        "are halves of pairs split by a UTF-16 decoder"
    )


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
    def _added_tokens(self) -> dict[int, Any]:
        """The backend's added tokens (``AddedToken`` with ``content``, ``special``, ``normalized``) by id."""
        return {int(i): tok for i, tok in self.backend.get_added_tokens_decoder().items()}

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens: added tokens flagged special (by ``transformers`` or by the backend), plus the
        configured bos/eos/pad/unk and the model's unknown token."""
        ids = {int(i) for i, tok in self.hf.added_tokens_decoder.items() if tok.special}
        ids |= {i for i, tok in self._added_tokens.items() if tok.special}
        for tid in (self.hf.bos_token_id, self.hf.eos_token_id, self.hf.pad_token_id, self.unk_id):
            if tid is not None:
                ids.add(int(tid))
        return frozenset(i for i in ids if 0 <= i < self.vocab_size)

    def _model_piece_bytes(self, piece: str, byte_fallback: bool) -> bytes:
        """Canonical bytes of a model vocabulary string, spelled the way this family spells bytes."""
        if self.family == "byte_level":
            try:
                return bytes(_BYTE_LEVEL[c] for c in piece)
            except KeyError:  # a piece outside the byte alphabet: take its text
                return piece.encode("utf-8")
        if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:  # "<0xZZ>" is an ordinary piece
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    @cached_property
    def _normalizer_steps(self) -> list[dict[str, Any]]:
        """The normaliser as a flat list of steps (a ``Sequence`` unrolled)."""
        def flat(norm: Any) -> list[dict[str, Any]]:
            if not isinstance(norm, dict):
                return []
            if norm.get("type") == "Sequence":
                return [step for sub in norm.get("normalizers") or [] for step in flat(sub)]
            return [norm]

        return flat(self._config.get("normalizer"))

    def _unnormalized_bytes(self, content: str) -> bytes:
        """The original-text bytes that the normaliser turns into ``content``: an added token with
        ``normalized=True`` is matched on normalised text, so its text is the pre-image of its content.

        Character maps are undone in reverse order: ``Replace(" " -> "▁")`` (SentencePiece spelled as a normaliser)
        gives ``"▁▁" -> b"  "``, a ``ByteLevel`` normaliser gives ``"Ġ" -> b" "``. Steps that do not map characters
        one way (NFC, lowercase, ``Prepend``, regex replacements) leave the content as it is."""
        text = content
        for step in reversed(self._normalizer_steps):
            kind = step.get("type")
            pattern = step.get("pattern")
            if kind == "Replace" and isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
                if step.get("content"):
                    text = text.replace(step["content"], pattern["String"])
            elif kind == "ByteLevel" and text and all(c in _BYTE_LEVEL for c in text):
                text = bytes(_BYTE_LEVEL[c] for c in text).decode("utf-8", errors="surrogateescape")
        try:
            return text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate in the content itself
            return text.encode("utf-8", errors="surrogatepass")

    @cached_property
    def _vocab_bytes(self) -> list[bytes]:
        """Canonical bytes of every id.

        * model pieces: spelled per family (``Ġ``/``▁`` -> space, ``<0xNN>`` -> that byte);
        * special tokens: the UTF-8 of their text;
        * other added tokens: with ``normalized=False`` they are matched on the raw text, so their bytes are their
          UTF-8 content; with ``normalized=True`` they are matched on normalised text, so their bytes are what the
          normaliser turned into the content (a SentencePiece ``"▁▁"`` is two spaces, as a model piece would be).
          An added token that is also a model piece keeps the model piece's bytes: the model produces it from
          ordinary text."""
        table: list[bytes] = [b""] * self.vocab_size
        byte_fallback = bool((self._config.get("model") or {}).get("byte_fallback"))
        model_ids: set[int] = set()
        for piece, tid in self.backend.get_vocab(with_added_tokens=False).items():
            if 0 <= tid < self.vocab_size:
                table[tid] = self._model_piece_bytes(piece, byte_fallback)
                model_ids.add(tid)
        special = self.special_ids
        for tid, tok in self._added_tokens.items():
            if not 0 <= tid < self.vocab_size:
                continue
            if tid in special:
                table[tid] = tok.content.encode("utf-8", errors="surrogatepass")
            elif tid in model_ids:
                continue
            elif tok.normalized:
                table[tid] = self._unnormalized_bytes(tok.content)
            else:
                table[tid] = tok.content.encode("utf-8", errors="surrogatepass")
        return table

    def token_bytes(self, token_id: int) -> bytes:
        """Canonical bytes of vocabulary entry ``token_id``: the bytes of original text it stands for (for special
        tokens: the UTF-8 of their text; for added tokens: the text they are matched on, see ``_vocab_bytes``)."""
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

    @cached_property
    def unk_id(self) -> int | None:
        """Id of the unknown token: the configured ``unk_token``, else the model's own (None when it has none)."""
        if self.hf.unk_token_id is not None:
            return int(self.hf.unk_token_id)
        piece = (self._config.get("model") or {}).get("unk_token")
        tid = self.backend.token_to_id(piece) if isinstance(piece, str) else None
        return int(tid) if tid is not None and 0 <= tid < self.vocab_size else None

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, *, add_special_tokens: bool = True) -> Encoding:
        """Token ids of ``text`` and the exact byte span of the original text that each one covers.

        Args:
            text: the text, any ``str`` of valid Unicode. An empty text (an empty assistant turn, a blank document),
                or one made only of special tokens or of whitespace the tokenizer drops, gives an :class:`Encoding`
                whose tokens all have empty spans: the alignment holds no chunk for it, and
                ``uncovered_bytes`` / ``special_in_text`` say why.
            add_special_tokens: add the BOS/EOS that the tokenizer's post-processor adds (as the model sees it).

        Returns:
            :class:`Encoding` with ``ids (n,)`` and ``spans (n, 2)``.

        Raises:
            TypeError: ``text`` is not a ``str``.
            ValueError: ``text`` holds an unpaired surrogate (``"\\ud800"``), which has no UTF-8 bytes.
        """
        if not isinstance(text, str):
            hint = " (decode it first: data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"encode() takes a str, got {type(text).__name__}: {text!r:.80}{hint}")
        try:
            enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        except Exception as err:
            bad = _surrogate_error(text, "encode(): the text")
            if bad is not None:
                raise bad from err
            raise
        return self._encoding_from(text, enc, add_special_tokens)

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[Encoding]:
        """:meth:`encode` for many texts, tokenized in parallel by the backend (empty texts allowed)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"encode_batch() takes a list of str, got one {type(texts).__name__} {texts!r:.60}; "
                            "use encode() for a single text or pass [text]")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch(): text {i} is a {type(text).__name__} ({text!r:.60}), not a str; "
                                "pass a list of str")
        try:
            encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception as err:
            for i, text in enumerate(texts):
                bad = _surrogate_error(text, f"encode_batch(): text {i}")
                if bad is not None:
                    raise bad from err
            raise
        return [self._encoding_from(t, e, add_special_tokens) for t, e in zip(texts, encs)]

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

    @cached_property
    def _post_processor_specials(self) -> int | None:
        """How many tokens the post-processor adds to one text, or None when some of them are not special ids
        (then the fast path cannot tell them from special tokens written in the text, and stays off)."""
        try:
            enc = self.backend.encode("", add_special_tokens=True)
        except Exception:  # a backend that refuses an empty text: no fast path with added tokens
            return None
        ids = np.asarray(enc.ids, dtype=np.int64)[np.asarray(enc.special_tokens_mask, dtype=bool)]
        if ids.shape[0] and (ids.max() >= self.vocab_size or not self.special_mask[ids].all()):
            return None
        return int(ids.shape[0])

    @cached_property
    def _segment_break_mask(self) -> np.ndarray:
        """``(vocab_size,)`` bool: non-special added tokens matched on the raw text. They split the text into
        pieces that are normalised one by one, and a SentencePiece ``Prepend`` adds a ``▁`` to every piece.
        (Special ids are kept off the fast path by their count.)"""
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[[i for i, tok in self._added_tokens.items() if not tok.normalized and 0 <= i < self.vocab_size]] = True
        mask &= ~self.special_mask
        return mask

    def _fast_spans(self, text: str, ids: np.ndarray, add_special_tokens: bool = True) -> np.ndarray | None:
        """Spans from cumulative canonical byte lengths, or None when that is not provably exact for ``text``.

        Exactness: with these pipelines every byte of the text is spelled by exactly one token, in order, so the
        running sum of token lengths IS the byte offset. Any special id beyond those the post-processor adds (a
        special token written in the text, an ``<unk>``) sends the text down the offsets path, which tells
        control tokens from text; so does a total that differs from the text's length (any other surprise)."""
        mode = self._byte_exact_mode
        if mode is None or (mode == "nfc" and not unicodedata.is_normalized("NFC", text)):
            return None
        if ids.shape[0] == 0 or ids.max() >= self.vocab_size:
            return None
        special = self.special_mask[ids]
        expected = self._post_processor_specials if add_special_tokens else 0
        if expected is None or int(np.count_nonzero(special)) != expected:
            return None
        if mode == "prefix_space" and self._segment_break_mask[ids].any():
            return None  # every piece between raw-matched added tokens gets its own phantom "▁"
        lengths = np.where(special, 0, self.token_lengths[ids])
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

    def _encoding_from(self, text: str, enc: Any, add_special_tokens: bool = True) -> Encoding:
        ids = np.array(enc.ids, dtype=np.int64)
        fast = self._fast_spans(text, ids, add_special_tokens)
        if fast is not None:
            return Encoding(ids=ids, spans=fast, num_bytes=int(fast[-1, 1]) if fast.shape[0] else 0)
        return self._encoding_from_offsets(text, enc, ids)

    def _control_tokens(self, text: str, ids: np.ndarray, char_offsets: np.ndarray, byte_starts: np.ndarray,
                        byte_ends: np.ndarray, in_text: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: special tokens found written in the text. They are control tokens whatever other role
        they have (GPT-2's ``<|endoftext|>`` is also its unk token; Mistral's ``<unk>`` is an added special token).

        The one exception is a genuine unknown token: the model emits ``<unk>`` for text it cannot spell, and that
        token stands for the text it covers. It is told from the literal token by its covered text, which then is
        not the token's own content (the tokenizer matches added tokens in the text before the model runs).
        Vectorised for the common case (the covered bytes ARE the content); the rest is looked at one by one."""
        in_range = ids < self.vocab_size
        control = self.special_mask[np.where(in_range, ids, 0)] & in_range & in_text
        unk = self.unk_id
        if unk is None:
            return control
        candidates = np.flatnonzero(control & (ids == unk))
        if not candidates.shape[0]:
            return control
        content = self._added_tokens[unk].content if unk in self._added_tokens else (self.backend.id_to_token(unk)
                                                                                       or "")
        want = np.frombuffer(content.encode("utf-8"), dtype=np.uint8)
        literal = (byte_ends[candidates] - byte_starts[candidates]) == want.shape[0]
        if want.shape[0] and literal.any():
            data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            rows = byte_starts[candidates[literal]][:, None] + np.arange(want.shape[0])
            literal[literal] = (data[rows] == want).all(axis=1)
        normalizer = self.backend.normalizer
        verdict: dict[str, bool] = {}
        for i in candidates[~literal].tolist():  # genuine unknowns, or the literal with stripped whitespace
            covered = text[char_offsets[i, 0]:char_offsets[i, 1]]
            if covered not in verdict:
                same = covered.strip() == content
                if not same and normalizer is not None:
                    same = normalizer.normalize_str(covered).strip().strip("\u2581") == content
                verdict[covered] = same
            control[i] = verdict[covered]
        return control

    def _encoding_from_offsets(self, text: str, enc: Any, ids: np.ndarray) -> Encoding:
        n = ids.shape[0]
        cb = char_to_byte_offsets(text)
        num_bytes = int(cb[-1])
        spans = np.zeros((n, 2), dtype=np.int64)
        if n == 0:  # an empty text, or one the tokenizer drops entirely, with no BOS/EOS
            return Encoding(ids=ids, spans=spans, num_bytes=num_bytes, uncovered_bytes=num_bytes)
        char_offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(n, 2)
        added = np.asarray(enc.special_tokens_mask, dtype=bool)  # tokens the post-processor added (BOS/EOS)
        byte_starts = cb[char_offsets[:, 0]]
        byte_ends = cb[char_offsets[:, 1]]
        in_text = ~added & (byte_ends > byte_starts)
        control = self._control_tokens(text, ids, char_offsets, byte_starts, byte_ends, in_text)
        content = in_text & ~control
        idx = np.flatnonzero(content)
        if idx.shape[0]:
            spans[idx, 0], spans[idx, 1] = _fix_spans(byte_starts[idx], byte_ends[idx], self.token_lengths[ids[idx]])
            self._absorb_gaps(text, spans, idx, num_bytes, byte_starts[control], byte_ends[control])
        _place_empty_spans(spans, num_bytes)
        covered = int((spans[:, 1] - spans[:, 0]).sum())
        unk = self.unk_id
        unknown = int(((ids == unk) & ~control).sum()) if unk is not None else 0
        return Encoding(ids=ids, spans=spans, num_bytes=num_bytes, uncovered_bytes=num_bytes - covered,
                        unknown_tokens=unknown, special_in_text=int(control.sum()))

    def _absorb_gaps(self, text: str, spans: np.ndarray, idx: np.ndarray, num_bytes: int,
                     control_starts: np.ndarray, control_ends: np.ndarray) -> None:
        """Give uncovered bytes that the normaliser merged into a neighbour (NFC folds ``e`` + U+0301 into one
        character whose offsets cover the ``e`` only) to the content token before them (or after them, where a
        control token or the start of the text comes before).

        Special tokens written in the text are occupied, not gaps: the free pieces are what neither a content
        token nor a control token covers, found with one sort, so a text holding many special tokens costs no
        more than one holding none. Bytes the normaliser deletes outright, and whitespace a pre-tokenizer drops,
        stay uncovered and are reported. Only the free pieces are examined in Python, each distinct text once."""
        nonempty = spans[idx, 1] > spans[idx, 0]
        tok = idx[nonempty]
        if not tok.shape[0]:
            return
        starts = np.concatenate((spans[tok, 0], control_starts))
        ends = np.concatenate((spans[tok, 1], control_ends))
        owner = np.concatenate((tok, np.full(control_starts.shape[0], -1, dtype=np.int64)))  # -1: a control token
        if control_starts.shape[0]:
            order = np.argsort(starts, kind="stable")
            starts, ends, owner = starts[order], ends[order], owner[order]
        run = np.maximum.accumulate(ends)
        # The interval that reaches the running end: the left neighbour of a free piece after it.
        reach = np.maximum.accumulate(np.where(ends >= run, np.arange(ends.shape[0]), 0))
        piece_start = np.concatenate(([0], run))
        piece_end = np.concatenate((starts, [num_bytes]))
        left = np.concatenate(([-1], owner[reach]))
        right = np.append(owner, -1)
        free = np.flatnonzero((piece_end > piece_start) & ((left >= 0) | (right >= 0)))
        if not free.shape[0]:
            return
        data = text.encode("utf-8")
        # Pieces made only of ASCII whitespace are dropped whitespace: decided without a Python loop.
        raw = np.frombuffer(data, dtype=np.uint8)
        solid = np.ones(raw.shape[0] + 1, dtype=np.int64)
        solid[0] = 0
        solid[1:] = ~np.isin(raw, _ASCII_SPACE)
        np.cumsum(solid, out=solid)
        solid_piece = solid[piece_end[free]] > solid[piece_start[free]]
        free = free[solid_piece]
        if not free.shape[0]:
            return
        pieces = [data[lo:hi] for lo, hi in zip(piece_start[free].tolist(), piece_end[free].tolist())]
        normalizer = self.backend.normalizer

        def kept(piece: bytes) -> bool:
            chars = piece.decode("utf-8", errors="replace")
            # Whitespace a pre-tokenizer drops is not part of any token; nor is what the normaliser deletes
            # (a SentencePiece normaliser spells the dropped whitespace "▁" and may prepend one).
            normalized = normalizer.normalize_str(chars) if normalizer is not None else chars
            return bool(normalized.strip().strip("\u2581").strip())

        verdict = {piece: kept(piece) for piece in set(pieces)}  # each distinct text once
        taken = free[np.fromiter((verdict[piece] for piece in pieces), dtype=bool, count=len(pieces))]
        to_left = left[taken] >= 0
        spans[left[taken[to_left]], 1] = piece_end[taken[to_left]]
        spans[right[taken[~to_left]], 0] = piece_start[taken[~to_left]]

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))


from .loading import load_tokenizer  # noqa: E402  (re-exported: it builds TokenizerViews)
