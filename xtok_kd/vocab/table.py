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

import json
import os
from typing import Any

from ..directions import Direction, direction_code
from ..tokenizer import TokenizerView, load_tokenizer
from .files import write_atomically
from .table_file import (  # noqa: F401  (half_up, table_file_problem and the private helpers are imported from here)
    _FORMAT,
    _META_KEY,
    FORMAT_VERSION,
    TENSORS,
    _checksum,
    _from_file_arrays,
    _read_checked,
    _to_file_arrays,
    _to_torch,
    check_save_target,
    half_up,
    table_file_problem,
)

__all__ = ["FORMAT_VERSION", "VocabAlignment", "check_save_target", "half_up", "table_file_problem"]

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
        from .. import __version__
        from .build import build_arrays

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
