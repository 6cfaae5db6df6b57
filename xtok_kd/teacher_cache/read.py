"""Reading a finished teacher cache as a dataset."""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .format import _FIX, TOKENIZER_DIR, _shard_problem, read_manifest


# ---------------------------------------------------------------------- reading
class TeacherCache(torch.utils.data.Dataset):
    """A finished teacher cache as a dataset: row ``i`` is example ``i`` with its cached teacher top-k.

    ``cache[i]`` is ``{**example, "teacher_input_ids_cached": (n,) int64, "teacher_topk_ids": (n, k) int64,
    "teacher_topk_logprobs": (n, k) float32, "teacher_next_token_logprobs": (n,) float32}`` (numpy arrays, n = the
    example's teacher tokens after truncation; ``teacher_next_token_logprobs[j]`` is the teacher's log-probability
    of ``teacher_input_ids_cached[j + 1]``, 0 at ``j = n - 1``).
    Shards are read lazily (memory-mapped slices of at most ``max_open_shards`` open files).

    Args:
        path: the cache folder.
        teacher / student: tokenizers to check against the cache (:meth:`check_pair`); None: not checked.
        verify: check every shard's sha256 on open (sizes and array shapes are always checked).

    Raises:
        ValueError: no or a corrupt manifest; a cache of another format version (naming the command that
            rebuilds it); an unfinished cache; a missing, truncated, corrupt or inconsistent
            shard (naming the file and how to resume or rebuild); a tokenizer pair the cache was not made for.
    """

    def __init__(self, path: str | os.PathLike[str], *, teacher: Any = None, student: Any = None,
                 verify: bool = True, max_open_shards: int = 4) -> None:
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.shards = sorted(m["shards"], key=lambda e: e["start"])
        done = sum(e["stop"] - e["start"] for e in self.shards)
        if not m.get("complete") or done != m["num_examples"]:
            raise ValueError(f"the teacher cache {str(self.path)!r} is incomplete: {done} of {m['num_examples']} "
                             f"examples are finished (its writing was interrupted, or is still running); to resume, {_FIX}")
        for e in self.shards:
            problem = _shard_problem(self.path, e, m["k"], verify=verify)
            if problem is not None:
                raise ValueError(f"{problem}; {_FIX}")
        self.top_k, self.max_length, self.loss_on = int(m["k"]), m["max_length"], m["loss_on"]
        self.teacher_fingerprint = m["teacher_tokenizer"]["fingerprint"]
        self.student_fingerprint = m["student_tokenizer"]["fingerprint"]
        self._starts = [e["start"] for e in self.shards]
        self._max_open = max_open_shards
        self._open: OrderedDict[int, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()
        self._teacher_tokenizer = None
        if teacher is not None or student is not None:
            self.check_pair(teacher, student)

    @property
    def teacher_tokenizer(self) -> Any:
        """The teacher's :class:`~xtok_kd.TokenizerView`, loaded from ``teacher_tokenizer/`` and checked."""
        if self._teacher_tokenizer is None:
            from ..tokenizer import load_tokenizer

            folder = self.path / TOKENIZER_DIR
            try:
                view = load_tokenizer(str(folder))
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"the cache's teacher tokenizer {str(folder)!r} cannot be loaded ({err}); {_FIX}"
                                 ) from None
            if view.fingerprint != self.teacher_fingerprint:
                raise ValueError(f"the cache's teacher tokenizer {str(folder)!r} has fingerprint {view.fingerprint}, "
                                 f"the manifest says {self.teacher_fingerprint}; {_FIX}")
            self._teacher_tokenizer = view
        return self._teacher_tokenizer

    def check_pair(self, teacher_tokenizer: Any = None, student_tokenizer: Any = None) -> None:
        """Raise ValueError unless the given tokenizers (None: not checked) are the ones the cache was made with."""
        from ..tokenizer import load_tokenizer

        wrong = []
        for side, given, expected in (("teacher", teacher_tokenizer, self.teacher_fingerprint),
                                      ("student", student_tokenizer, self.student_fingerprint)):
            if given is not None:
                view = load_tokenizer(given)
                if view.fingerprint != expected:
                    name = self.manifest[f"{side}_tokenizer"]["name"]
                    wrong.append(f"{side} tokenizer {view.name!r} has fingerprint {view.fingerprint}, the cache "
                                 f"expects {expected} ({name!r})")
        if wrong:
            raise ValueError(f"the teacher cache {str(self.path)!r} was made for another tokenizer pair: "
                             f"{'; '.join(wrong)}. Fix: use the cache's tokenizers (cache.teacher_tokenizer, and the "
                             "student it names), or build a cache for this pair with `xtok-kd cache-teacher`")

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def _shard(self, s: int) -> tuple[Any, np.ndarray, np.ndarray]:
        from safetensors import safe_open

        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        handle = safe_open(str(self.path / self.shards[s]["file"]), "numpy")
        item = (handle, handle.get_tensor("offsets"), handle.get_tensor("example_offsets"))
        self._open[s] = item
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"teacher cache index {i!r} out of range for {n} examples")
        i = int(i) % n
        s = bisect.bisect_right(self._starts, i) - 1
        handle, offsets, ex_offsets = self._shard(s)
        j = i - self.shards[s]["start"]
        a, b = int(offsets[j]), int(offsets[j + 1])
        example = json.loads(bytes(handle.get_slice("examples")[int(ex_offsets[j]):int(ex_offsets[j + 1])]))
        k = self.top_k
        if b > a:
            ids = handle.get_slice("input_ids")[a:b].astype(np.int64)
            top = handle.get_slice("topk_ids")[a:b].astype(np.int64)
            lps = handle.get_slice("topk_logprobs")[a:b]
            nxt = handle.get_slice("next_token_logprobs")[a:b]
        else:
            ids, top, lps = np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
            nxt = np.zeros(0, np.float32)
        return {**example, "teacher_input_ids_cached": ids, "teacher_topk_ids": top, "teacher_topk_logprobs": lps,
                "teacher_next_token_logprobs": nxt}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: open handles are not picklable
        return {**self.__dict__, "_open": OrderedDict()}
