"""VocabAlignment: the saved, fingerprinted map between a teacher and a student vocabulary.

File format (``.safetensors``, format version 2): sparse arrays plus one metadata entry ``"xtok_kd"``, a JSON
object ``{"checksum": ..., "table": <JSON text>}``. The table text holds the format version, both tokenizers'
names, fingerprints and vocabulary sizes, methods and parameters, statistics, library version and the command
that made it; the checksum is a sha256 over that text and every array. Ids are stored as uint16 when the
vocabulary they index has at most 65,535 ids (-1 stored as 65535), else as int32; decompositions as pieces plus
uint16 lengths (offsets and first pieces are derived on load), token byte lengths as uint16, neighbours only for
the rows that have some, their scores as float16. In memory every id and length tensor is int64, scores are
float32 and neighbours are dense.

Version 2 (this one) added each side's token byte lengths, raised the default number of neighbours (the CDM
candidates) from 4 to 8, stores neighbour scores as float16 rounded up (version 1: float32) and ids into a small
vocabulary as uint16 (version 1: int32). A file of another version is refused with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from typing import Any

import numpy as np

from ..tokenizer import TokenizerView, load_tokenizer
from ..directions import Direction, direction_code
from .files import name_problem, probe_writable, write_atomically

__all__ = ["FORMAT_VERSION", "VocabAlignment", "check_save_target", "half_up", "table_file_problem"]

FORMAT_VERSION = 2
_FORMAT = "xtok_kd.vocab_alignment"
_META_KEY = "xtok_kd"
_PER_DIRECTION = ("first", "weight", "offsets", "pieces", "neighbours", "neighbour_scores")
TENSORS = ("exact_teacher", "exact_student", "special_teacher", "special_student", "teacher_token_lengths",
           "student_token_lengths") + tuple(
    f"{d}_{name}" for d in ("t2s", "s2t") for name in _PER_DIRECTION
)
_FLOAT = {"t2s_weight", "s2t_weight", "t2s_neighbour_scores", "s2t_neighbour_scores"}
_LENGTHS = {"teacher_token_lengths", "student_token_lengths"}


class VocabAlignment:
    """A map between two vocabularies: exact matches, projections, neighbours and special-token pairs.

    Tensors (torch, on :attr:`device`; ``Vt``/``Vs`` vocabulary sizes, ``K`` neighbours per token):

    * ``exact_teacher``, ``exact_student``: ``(E,)`` int64, all pairs of non-special ids with equal canonical bytes.
    * ``teacher_token_lengths`` ``(Vt,)`` and ``student_token_lengths`` ``(Vs,)``: int64 canonical byte length of
      each id, 0 for special and empty tokens. A projection's first piece is a prefix of its token, so their
      lexical similarity is ``len(first) / len(token)``.
    * ``t2s_first``: ``(Vt,)`` int64, first student token of each teacher token's re-tokenised bytes (-1 if none);
      ``t2s_weight``: ``(Vt,)`` float32, 1.0 where mapped; ``t2s_offsets`` ``(Vt + 1,)`` int64 and ``t2s_pieces``
      ``(N,)`` int64, the full decomposition in CSR form.
    * ``t2s_neighbours`` ``(Vt, K)`` int64 (-1 padded) and ``t2s_neighbour_scores`` ``(Vt, K)`` float32 in [0, 1]:
      the ``K`` student tokens most similar to each teacher token by normalised Levenshtein similarity on
      canonical bytes (:func:`.fuzzy.similarity`), best first, for non-special, non-empty teacher tokens with no
      exact match (other rows are -1 / 0). These are the candidates of the contextual top-k mapping (CDM, see
      :mod:`xtok_kd.losses.cdm_match`), which keeps the best one present in the row's student top-k. Scores are
      rounded UP to the float16 grid (at most ``2**-11`` above the exact value, see :func:`half_up`), so the
      table in memory equals the file and a token exactly at a threshold such as 0.9 still passes it.
    * ``s2t_*``: the same from student to teacher.
    * ``special_teacher``, ``special_student``: ``(S,)`` int64 role-matched special pairs
      (roles in ``metadata["special_roles"]``); a special id with a partner maps to it in ``*_first``.

    Build with :meth:`build`, or :func:`xtok_kd.vocab.get_or_build` to cache it; save with :meth:`save`.
    """

    def __init__(self, tensors: dict[str, Any], *, metadata: dict[str, Any]) -> None:
        missing = [name for name in TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"VocabAlignment is missing tensors {missing}")
        for name in TENSORS:
            setattr(self, name, tensors[name])
        self.metadata = metadata
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ identity
    @property
    def teacher_name(self) -> str:
        return self.metadata["teacher"]["name"]

    @property
    def student_name(self) -> str:
        return self.metadata["student"]["name"]

    @property
    def teacher_fingerprint(self) -> str:
        return self.metadata["teacher"]["fingerprint"]

    @property
    def student_fingerprint(self) -> str:
        return self.metadata["student"]["fingerprint"]

    @property
    def teacher_vocab_size(self) -> int:
        return int(self.metadata["teacher"]["vocab_size"])

    @property
    def student_vocab_size(self) -> int:
        return int(self.metadata["student"]["vocab_size"])

    @property
    def stats(self) -> dict[str, float]:
        return self.metadata["stats"]

    @property
    def device(self) -> Any:
        return self.t2s_first.device

    def __repr__(self) -> str:
        return (
            f"VocabAlignment({self.teacher_name!r} [{self.teacher_fingerprint}] -> {self.student_name!r} "
            f"[{self.student_fingerprint}], exact={self.exact_teacher.shape[0]}, device={self.device})"
        )

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        teacher: Any,
        student: Any,
        *,
        neighbours: int = 8,
        window: int = 8,
        command: str | None = None,
        progress: bool = True,
    ) -> "VocabAlignment":
        """Build the table for ``teacher`` and ``student`` (a few seconds for two 150k vocabularies).

        Args:
            teacher: anything :func:`~xtok_kd.tokenizer.load_tokenizer` accepts (folder, hub id, tokenizer, view).
            student: likewise.
            neighbours: ``K``, edit-distance neighbours (the CDM candidates) kept per token without an exact
                match (0 to skip).
            window: candidates per side per sort order for the neighbour search (see :mod:`.fuzzy`).
            command: the command line to record in the metadata (the CLI passes its own).
            progress: show a tqdm bar over the build stages.
        """
        check_build_options(neighbours=neighbours, window=window)
        from .build import build_arrays
        from .. import __version__

        t_view, s_view = load_tokenizer(teacher), load_tokenizer(student)
        arrays, info, timings = build_arrays(t_view, s_view, neighbours=neighbours, window=window,
                                             progress=progress)
        metadata = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            "teacher": _describe(t_view),
            "student": _describe(s_view),
            "methods": ["exact", "projection", "neighbours", "specials"],
            "parameters": info["parameters"],
            "special_roles": info["special_roles"],
            "stats": info["stats"],
            "library_version": __version__,
            "command": command or f"VocabAlignment.build({t_view.name!r}, {s_view.name!r}, "
                                  f"neighbours={neighbours}, window={window})",
        }
        table = cls(_to_torch(arrays), metadata=metadata)
        table.timings = timings
        return table

    @classmethod
    def identity(cls, tokenizer: Any, **kwargs: Any) -> "VocabAlignment":
        """The table of a tokenizer with itself: ``t2s_first[i] == i`` for every id."""
        view = load_tokenizer(tokenizer)
        return cls.build(view, view, **kwargs)

    # ------------------------------------------------------------------ use
    def projection(self, direction: Direction) -> tuple[Any, Any, Any]:
        """Sparse COO map ``(src_ids, dst_ids, weights)``: ``(M,)`` int64, int64, float32.

        One entry per mapped source id. Pushing a distribution ``p`` ``(R, V_src)`` into the other vocabulary is
        ``out[:, dst_ids] += p[:, src_ids] * weights`` (``index_add_`` along dim 1).
        """
        d = _direction(direction)
        first = getattr(self, f"{d}_first")
        weight = getattr(self, f"{d}_weight")
        src = (first >= 0).nonzero().squeeze(1)
        return src, first[src], weight[src]

    def decomposition(self, direction: Direction, token_id: int) -> list[int]:
        """The other vocabulary's ids that spell source token ``token_id`` (empty if unmapped)."""
        d = _direction(direction)
        offsets = getattr(self, f"{d}_offsets")
        size = offsets.shape[0] - 1
        if not 0 <= int(token_id) < size:
            raise IndexError(f"token id {token_id} is outside the source vocabulary of {size} ids")
        lo, hi = int(offsets[token_id]), int(offsets[token_id + 1])
        return getattr(self, f"{d}_pieces")[lo:hi].tolist()

    def to(self, device: Any) -> "VocabAlignment":
        """Move every tensor to ``device`` (in place); returns ``self``."""
        for name in TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def check_tokenizers(self, *, teacher: Any = None, student: Any = None) -> None:
        """Raise ``ValueError`` when a given tokenizer's fingerprint differs from the one the table was built for."""
        for role, tok in (("teacher", teacher), ("student", student)):
            if tok is None:
                continue
            view = load_tokenizer(tok)
            want = self.metadata[role]
            if view.fingerprint != want["fingerprint"]:
                raise ValueError(
                    f"this table was built for {role} tokenizer {want['name']!r} (fingerprint {want['fingerprint']}), "
                    f"but the {role} given is {view.name!r} (fingerprint {view.fingerprint}); rebuild it with "
                    f"`xtok-kd align TEACHER STUDENT -o PATH` or pass the matching tokenizer"
                )

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
        """Write the table to ``path`` (``.safetensors``) atomically; returns the path.

        Args:
            path: the file to write; a missing folder is created.
            overwrite: replace an existing file at ``path``. Only an xtok_kd vocabulary table is ever replaced: a
                file of any other kind (model weights, a safetensors file without the xtok_kd marker, a folder)
                is refused even with ``overwrite=True``.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False, or it is not an xtok_kd table.
            ValueError: ``path`` is empty, holds a NUL character, or its file name is too long.
            IsADirectoryError, NotADirectoryError, PermissionError, OSError: ``path`` cannot be written; nothing is
                left behind (the content goes to a temp file in the same folder, removed on any failure).
        """
        from safetensors.numpy import save_file

        path = os.fspath(path)
        check_save_target(path, overwrite=overwrite)
        arrays = _to_file_arrays(self)
        meta = json.dumps(self.metadata, sort_keys=True)
        # one metadata entry: safetensors writes several in no fixed order, and files should be reproducible
        header = {_META_KEY: json.dumps({"checksum": _checksum(meta, arrays), "table": meta})}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomically(path, lambda tmp: save_file(arrays, tmp, metadata=header), replace=overwrite,
                         check_target=lambda: check_save_target(path, overwrite=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], teacher: Any = None, student: Any = None) -> "VocabAlignment":
        """Read a table saved by :meth:`save`, validating it; checks fingerprints when tokenizers are given.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is truncated, altered, of another format version, has arrays of the wrong
                shape or dtype, or a given tokenizer's fingerprint differs (the message names both).
        """
        arrays, metadata = _read_checked(os.fspath(path))
        table = cls(_from_file_arrays(arrays, metadata), metadata=metadata)
        table.check_tokenizers(teacher=teacher, student=student)
        return table


# ---------------------------------------------------------------------- helpers of this class
def check_build_options(*, neighbours: Any, window: Any) -> None:
    """Raise ``ValueError`` unless ``neighbours`` is an int >= 0 and ``window`` an int >= 1."""
    for key, value, low in (("neighbours", neighbours, 0), ("window", window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an int >= {low}, got {value!r}")


def _direction(direction: str) -> str:
    return direction_code(direction)


def _describe(view: TokenizerView) -> dict[str, Any]:
    return {"name": view.name, "fingerprint": view.fingerprint, "vocab_size": int(view.vocab_size),
            "family": view.family}


def _to_torch(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    out = {}
    for name in TENSORS:
        dtype = np.float32 if name in _FLOAT else np.int64
        out[name] = torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=dtype))
    return out


def half_up(scores: np.ndarray) -> np.ndarray:
    """``scores`` rounded up to the nearest float16 value, returned as float32 of the same shape.

    The file stores neighbour scores as float16; rounding up (not to nearest) keeps every stored score at or above
    its exact value (by less than ``2**-11`` in [0.5, 1]), so a threshold test ``score >= 0.9`` still passes a token
    whose exact similarity is 0.9. It may also pass one whose exact similarity is less than ``2**-11`` below the
    threshold: ``1 - d / n`` is that close to 0.9 only for tokens longer than about 200 characters.
    """
    x = np.asarray(scores, dtype=np.float32)
    half = x.astype(np.float16)
    low = half.astype(np.float32) < x
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half.astype(np.float32)


_ID_SENTINEL = np.iinfo(np.uint16).max  # -1 in a uint16 id array


def _id_arrays(vt: int, vs: int) -> dict[str, int]:
    """File arrays holding ids, each with the size of the vocabulary its ids index."""
    out = {"exact_teacher": vt, "special_teacher": vt, "exact_student": vs, "special_student": vs}
    for d, source, target in (("t2s", vt, vs), ("s2t", vs, vt)):
        out.update({f"{d}_pieces": target, f"{d}_neighbours": target, f"{d}_neighbour_rows": source})
    return out


def _id_dtype(vocab_size: int) -> np.dtype:
    """uint16 for ids into a vocabulary of at most 65,535 ids (65535 is then free to mean -1), else int32."""
    return np.dtype(np.uint16) if vocab_size <= _ID_SENTINEL else np.dtype(np.int32)


def _encode_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    dtype = _id_dtype(vocab_size)
    if dtype == np.uint16:
        ids = np.where(ids < 0, _ID_SENTINEL, ids)
    return np.ascontiguousarray(ids, dtype=dtype)


def _decode_ids(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> dict[str, np.ndarray]:
    """``arrays`` with every id array as int64, uint16 65535 back to -1."""
    out = dict(arrays)
    for name in _id_arrays(metadata["teacher"]["vocab_size"], metadata["student"]["vocab_size"]):
        ids = arrays[name].astype(np.int64)
        if arrays[name].dtype == np.uint16:
            ids[ids == _ID_SENTINEL] = -1
        out[name] = ids
    return out


def _to_file_arrays(table: VocabAlignment) -> dict[str, np.ndarray]:
    """Compact arrays for the file: ids as uint16 or int32 (:func:`_id_dtype`), uint16 lengths, neighbours only for
    rows that have some, float16 scores."""
    vocab = _id_arrays(table.teacher_vocab_size, table.student_vocab_size)
    out: dict[str, np.ndarray] = {}
    for name in TENSORS:
        value = getattr(table, name).detach().cpu().numpy()
        if name.endswith(("_neighbours", "_neighbour_scores", "_offsets", "_first")):
            continue
        if name in _LENGTHS:
            if value.size and (value.min() < 0 or value.max() > np.iinfo(np.uint16).max):
                raise ValueError(f"{name} must lie in [0, 65535] to be saved, got [{value.min()}, {value.max()}]")
            out[name] = value.astype(np.uint16)
        elif name in vocab:
            out[name] = _encode_ids(value, vocab[name])
        else:
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
    for d in ("t2s", "s2t"):
        offsets = getattr(table, f"{d}_offsets").detach().cpu().numpy()
        lengths = np.diff(offsets)
        if lengths.size and lengths.max() > np.iinfo(np.uint16).max:
            raise ValueError(f"{d}: a decomposition longer than 65535 pieces cannot be saved")
        pieces = getattr(table, f"{d}_pieces").detach().cpu().numpy()
        if not np.array_equal(getattr(table, f"{d}_first").detach().cpu().numpy(), _first(offsets, pieces)):
            raise ValueError(f"{d}_first is not the first piece of each decomposition; the file stores only pieces")
        out[f"{d}_lengths"] = lengths.astype(np.uint16)
        ids = getattr(table, f"{d}_neighbours").detach().cpu().numpy()
        scores = getattr(table, f"{d}_neighbour_scores").detach().cpu().numpy()
        rows = np.flatnonzero((ids >= 0).any(axis=1))
        out[f"{d}_neighbour_rows"] = _encode_ids(rows, vocab[f"{d}_neighbour_rows"])
        out[f"{d}_neighbours"] = _encode_ids(ids[rows], vocab[f"{d}_neighbours"])
        out[f"{d}_neighbour_scores"] = np.ascontiguousarray(half_up(scores[rows]), dtype=np.float16)
    return out


def _from_file_arrays(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> dict[str, Any]:
    sizes = {"t2s": metadata["teacher"]["vocab_size"], "s2t": metadata["student"]["vocab_size"]}
    full = dict(arrays)
    for d, size in sizes.items():
        del full[f"{d}_neighbour_rows"], full[f"{d}_lengths"]
        offsets = np.zeros(size + 1, dtype=np.int64)
        np.cumsum(arrays[f"{d}_lengths"], out=offsets[1:])
        full[f"{d}_offsets"] = offsets
        full[f"{d}_first"] = _first(offsets, arrays[f"{d}_pieces"])
        rows = arrays[f"{d}_neighbour_rows"]
        k = arrays[f"{d}_neighbours"].shape[1]
        ids = np.full((size, k), -1, dtype=np.int64)
        scores = np.zeros((size, k), dtype=np.float32)
        ids[rows] = arrays[f"{d}_neighbours"]
        scores[rows] = arrays[f"{d}_neighbour_scores"]
        full[f"{d}_neighbours"], full[f"{d}_neighbour_scores"] = ids, scores
    return _to_torch(full)


def _first(offsets: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """``(V,)`` int64 first piece of each CSR row, -1 for empty rows."""
    first = np.full(offsets.shape[0] - 1, -1, dtype=np.int64)
    mapped = np.flatnonzero(np.diff(offsets) > 0)
    first[mapped] = pieces[offsets[mapped]]
    return first


def _checksum(meta: str, arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the metadata JSON and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256(meta.encode("utf-8"))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + struct.pack(f"<{a.ndim}q", *a.shape))
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- what may be written where
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_NOT_TABLE = "is not an xtok_kd vocabulary table"


def table_file_problem(path: str | os.PathLike[str]) -> str | None:
    """``None`` when ``path`` is a regular file whose safetensors header carries the xtok_kd table marker (a
    ``"xtok_kd"`` metadata entry whose table has ``"format": "xtok_kd.vocab_alignment"``), else why it is not.

    Reads the header only; the arrays and checksum are not checked (a damaged table is still a table).
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except OSError as err:
        return f"cannot be examined ({err.strerror or err})"
    if not stat.S_ISREG(info.st_mode):
        return f"{_NOT_TABLE} (not a regular file)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{_NOT_TABLE} (not a safetensors file: {info.st_size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > min(info.st_size - 8, _MAX_HEADER):
                return f"{_NOT_TABLE} (not a safetensors file: no valid header)"
            blob = f.read(length)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    try:
        header = json.loads(blob)
        marker = header["__metadata__"][_META_KEY]
        table = json.loads(json.loads(marker)["table"])
        if table["format"] == _FORMAT:
            return None
    except (ValueError, KeyError, TypeError):
        pass
    return f"{_NOT_TABLE} (no xtok_kd table marker in its safetensors header)"


def check_save_target(path: str, *, overwrite: bool, force_hint: str = "overwrite=True",
                      create_folder: bool = True) -> None:
    """Raise unless a table may be written at ``path``: the rule :meth:`VocabAlignment.save` and the CLI share.

    ``path`` must not be a folder; an existing file is replaced only with ``overwrite`` and only when it is an
    xtok_kd table (:func:`table_file_problem`); its folder must be a writable folder (or missing, when
    ``create_folder``). ``force_hint`` is how the message names the override (``--force`` for the CLI).
    """
    if not path:
        raise ValueError("the table path is empty; pass a file path ending in .safetensors")
    if "\0" in path:
        raise ValueError(f"{path!r} contains a NUL character; pass a valid file path")
    if os.path.isdir(path):
        example = os.path.join(path, "pair.safetensors")
        raise IsADirectoryError(f"{path!r} is a folder; pass a file path such as {example!r}")
    problem = name_problem(path)
    if problem is not None:
        raise ValueError(f"cannot write {path!r}: {problem}")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(
                f"{path!r} already exists; pass {force_hint} to replace it (only an xtok_kd vocabulary table is "
                "ever replaced) or choose another path"
            )
        problem = table_file_problem(path)
        if problem is not None:
            raise FileExistsError(
                f"{path!r} exists and {problem}; it is never replaced, even with {force_hint}: choose another path"
            )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if os.path.lexists(folder) or any(os.path.isfile(p) for p in _parents(folder)):
            raise NotADirectoryError(f"cannot write {path!r}: a part of {folder!r} is a file, not a folder; "
                                     "choose another path")
        if not create_folder:
            raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist; create it "
                                    f"(mkdir -p {folder}) or choose another path")
        return
    try:
        probe_writable(folder)
    except OSError as err:
        raise PermissionError(f"cannot write {path!r}: no file can be created in {folder!r} "
                              f"({err.strerror or err}); choose a writable folder") from None


def _parents(folder: str) -> list[str]:
    out = []
    while True:
        parent = os.path.dirname(folder)
        if parent == folder:
            return out
        out.append(parent)
        folder = parent


# ---------------------------------------------------------------------- reading and validating a file
_DTYPE_NAMES = {np.dtype(np.int32): "I32", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(np.uint16): "U16"}


def _file_layout(metadata: dict[str, Any]) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Expected dtype and shape (``None``: any length) of every array in a file."""
    vt, vs = metadata["teacher"]["vocab_size"], metadata["student"]["vocab_size"]
    k = metadata["parameters"]["neighbours"]
    ids = {name: _DTYPE_NAMES[_id_dtype(size)] for name, size in _id_arrays(vt, vs).items()}
    layout: dict[str, tuple[str, tuple[int | None, ...]]] = {
        name: (ids[name], (None,)) for name in ("exact_teacher", "exact_student", "special_teacher", "special_student")
    }
    layout.update({"teacher_token_lengths": ("U16", (vt,)), "student_token_lengths": ("U16", (vs,))})
    for d, size in (("t2s", vt), ("s2t", vs)):
        layout.update({
            f"{d}_lengths": ("U16", (size,)), f"{d}_weight": ("F32", (size,)),
            f"{d}_pieces": (ids[f"{d}_pieces"], (None,)),
            f"{d}_neighbour_rows": (ids[f"{d}_neighbour_rows"], (None,)),
            f"{d}_neighbours": (ids[f"{d}_neighbours"], (None, k)), f"{d}_neighbour_scores": ("F16", (None, k)),
        })
    return layout


def _read_checked(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no vocabulary table at {path!r}; build one with `xtok-kd align TEACHER STUDENT -o {path}`"
        )

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path!r} is not a valid xtok_kd vocabulary table: {problem}")

    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise bad(f"the file has {len(blob)} bytes, too short for a safetensors header (truncated?)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise bad(f"its header claims {header_len} bytes but the file holds {len(blob) - 8} (truncated?)")
    try:
        header = json.loads(blob[8 : 8 + header_len])
        wrapper = json.loads(header["__metadata__"][_META_KEY])
        meta_text, checksum = wrapper["table"], wrapper["checksum"]
        metadata = json.loads(meta_text)
    except (ValueError, KeyError, TypeError) as err:
        raise bad(f"its header or xtok_kd metadata cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise bad(f"its metadata does not describe a {_FORMAT!r} file")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} is an xtok_kd vocabulary table of format version {metadata.get('format_version')!r}, but "
            f"this xtok_kd ({_library_version()}) reads format version {FORMAT_VERSION} only; rebuild it with "
            f"`{_rebuild_command(path, metadata)}`"
        )
    data_len = len(blob) - 8 - header_len
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise bad(f"its header describes no valid arrays ({type(err).__name__}: {err})") from None
    if end != data_len:
        raise bad(f"its arrays need {end} bytes of data but the file holds {data_len} (truncated or padded?)")
    try:
        from safetensors.numpy import load

        arrays = load(blob)
    except Exception as err:  # safetensors raises its own error type; report it as a format problem
        raise bad(f"safetensors cannot read it ({err})") from None
    try:
        layout = _file_layout(metadata)
    except (KeyError, TypeError) as err:
        raise bad(f"its metadata lacks {err}") from None
    problems = []
    for name, (dtype, shape) in layout.items():
        if name not in arrays:
            problems.append(f"array {name!r} is missing")
            continue
        a = arrays[name]
        got = _DTYPE_NAMES.get(a.dtype, str(a.dtype))
        if got != dtype or a.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, a.shape)):
            want = tuple("*" if w is None else w for w in shape)
            problems.append(f"array {name!r} is {got}{tuple(a.shape)}, expected {dtype}{want}")
    if problems:
        raise bad("; ".join(problems))
    if _checksum(meta_text, arrays) != checksum:
        raise bad("its checksum does not match its contents (the file was altered or damaged)")
    arrays = _decode_ids(arrays, metadata)
    _check_values(arrays, metadata, bad)
    return arrays, metadata


def _library_version() -> str:
    from .. import __version__

    return __version__


def _rebuild_command(path: str, metadata: dict[str, Any]) -> str:
    """The ``xtok-kd align`` command that rebuilds the table at ``path``, with the tokenizer names it records
    (``TEACHER`` / ``STUDENT`` where the metadata has none)."""
    import shlex

    names = []
    for role in ("teacher", "student"):
        entry = metadata.get(role)
        name = entry.get("name") if isinstance(entry, dict) else None
        names.append(shlex.quote(name) if isinstance(name, str) and name else role.upper())
    return f"xtok-kd align {names[0]} {names[1]} -o {shlex.quote(path)} --force"


def _check_values(arrays: dict[str, np.ndarray], metadata: dict[str, Any], bad: Any) -> None:
    vt, vs = metadata["teacher"]["vocab_size"], metadata["student"]["vocab_size"]
    target = {"t2s": vs, "s2t": vt}
    ranges = {"exact_teacher": vt, "exact_student": vs, "special_teacher": vt, "special_student": vs}
    for d, size in target.items():
        if int(arrays[f"{d}_lengths"].sum(dtype=np.int64)) != arrays[f"{d}_pieces"].shape[0]:
            raise bad(f"{d}_lengths do not add up to the length of {d}_pieces")
        ranges.update({f"{d}_pieces": size, f"{d}_neighbours": size})
        rows = arrays[f"{d}_neighbour_rows"]
        if rows.shape[0] != arrays[f"{d}_neighbours"].shape[0] or np.any(rows < 0) or np.any(
                rows >= (vt if d == "t2s" else vs)):
            raise bad(f"{d}_neighbour_rows do not index the {d}_neighbours rows")
    for d in target:
        scores = arrays[f"{d}_neighbour_scores"]
        if scores.size and not (np.all(scores >= 0) and np.all(scores <= 1)):
            raise bad(f"array '{d}_neighbour_scores' holds scores outside [0, 1]")
    for name, size in ranges.items():
        a = arrays[name]
        low = -1 if name.endswith("_neighbours") else 0
        if a.size and (a.min() < low or a.max() >= size):
            raise bad(f"array {name!r} holds ids outside [{low}, {size})")
