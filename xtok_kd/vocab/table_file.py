"""The vocabulary table's file (format described in :mod:`.table`): format constants, array encoding, checksum,
where a table may be written, and reading and validating a file. The class in :mod:`.table` imports from
here; nothing here imports the class."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from typing import Any

import numpy as np

from .files import name_problem, probe_writable

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


def _to_file_arrays(table: Any) -> dict[str, np.ndarray]:
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
