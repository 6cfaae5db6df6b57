"""Teacher top-k cache: run the teacher once, distill from its saved top-k many times.

A cache is a folder::

    manifest.json              format, version, settings (tokenizer fingerprints, top_k, max_length, loss_on,
                               digests of the examples and of the teacher model), and the finished shards
                               (file, example range [start, stop), tokens, bytes, sha256)
    shard-00000.safetensors    E examples holding T teacher tokens in all:
        input_ids (T,) int32          each example's unpadded teacher ids (as the collator makes them), concatenated
        topk_ids (T, k) int32         the teacher's k most likely next tokens at each position
        topk_logprobs (T, k) float32  their log-probabilities (full softmax, temperature 1)
        offsets (E+1,) int64          example e's tokens are rows [offsets[e], offsets[e+1])
        examples (J,) uint8           each example as UTF-8 JSON, concatenated; example_offsets (E+1,) int64
    teacher_tokenizer/         the teacher's tokenizer: distilling from the cache needs no teacher at all

Every shard is written to a temp file and renamed into place, then the manifest is rewritten the same way, so a
killed run leaves finished shards that a rerun with the same settings verifies (size, sha256) and keeps.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .vocab.files import remove_stale_temps, write_atomically

__all__ = ["FORMAT", "VERSION", "TeacherCache", "cache_dir_problem", "cache_settings", "collate_teacher_topk",
           "read_manifest", "settings_mismatch", "teacher_topk", "write_teacher_cache"]

logger = logging.getLogger(__name__)

FORMAT, VERSION = "xtok_kd.teacher_cache", 1
MANIFEST, TOKENIZER_DIR, LOCK = "manifest.json", "teacher_tokenizer", ".cache-teacher.lock"
_OURS = re.compile(r"^(manifest\.json|teacher_tokenizer|shard-\d{5,}\.safetensors|\.cache-teacher\.lock"
                   r"|\..*\.xtok-tmp-.*|\.teacher_tokenizer\.tmp-.*)$", re.DOTALL)
_FIX = ("rerun `xtok-kd cache-teacher` with the same options (or write_teacher_cache with the same arguments): "
        "it keeps the verified shards and recomputes the rest")
_ROW_ELEMENTS = 1 << 25  # log_softmax over at most this many fp32 values at once (128 MB)
#: settings that must agree to resume or extend a cache, with the words that name them in messages
_COMPARED = {"teacher_tokenizer": "teacher tokenizer", "student_tokenizer": "student tokenizer", "top_k": "top_k",
             "max_length": "max_length", "loss_on": "loss_on", "num_examples": "number of examples",
             "examples_sha256": "examples (their digest)", "shard_size": "shard_size",
             "teacher_model": "teacher model (config, dtype and weights digest)"}


def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``log_softmax(logits[..., :vocab_size].float(), -1)``: the values a cache stores.

    The trainer calls this same function on a live teacher, so cached and live top-k are bit-identical for the
    same logits. Rows are processed a block at a time (memory ~128 MB of fp32 per block), which does not change
    any row's values.

    Args:
        logits: ``(B, L, W)`` teacher logits, any float dtype; ``W >= vocab_size`` (padding columns are cut).
        k: how many; clamped to the vocabulary.
        vocab_size: the teacher tokenizer's number of ids (default ``W``).

    Returns:
        ``ids`` ``(B, L, k)`` int64 and ``logprobs`` ``(B, L, k)`` float32, most likely first, on ``logits``' device.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a (B, L, W) float tensor, got {getattr(logits, 'shape', type(logits))}")
    width = logits.shape[-1]
    vocab = width if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= width:
        raise ValueError(f"teacher logits have {width} columns but vocab_size is {vocab_size}: the tokenizer is not "
                         "the model's; pass the teacher model's own tokenizer")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    k = min(k, vocab)
    batch, length = logits.shape[:2]
    flat = logits.reshape(-1, width)
    ids = torch.empty((flat.shape[0], k), dtype=torch.long, device=logits.device)
    logprobs = torch.empty((flat.shape[0], k), dtype=torch.float32, device=logits.device)
    step = max(1, _ROW_ELEMENTS // vocab)
    with torch.no_grad():
        for a in range(0, flat.shape[0], step):
            values, top = torch.log_softmax(flat[a:a + step, :vocab].float(), dim=-1).topk(k, dim=-1)
            ids[a:a + step], logprobs[a:a + step] = top, values
    return ids.view(batch, length, k), logprobs.view(batch, length, k)


# ---------------------------------------------------------------------- settings and the cache folder
def _example_json(example: Any, index: int) -> str:
    if not isinstance(example, Mapping):
        raise TypeError(f"example {index} must be a dict with 'text' or 'messages', got {type(example).__name__}")
    try:
        return json.dumps(example, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"example {index} cannot be stored as JSON ({err}); keep only str/number/list/dict "
                         "values in examples") from None


def _model_digest(model: Any) -> str:
    """sha256 (16 hex) of the model's config, parameter names/shapes/dtypes and the first values of each."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items()
               if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            if p.device.type != "meta" and p.numel():
                h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_settings(teacher_tokenizer: Any, student_tokenizer: Any, examples: Sequence[Mapping[str, Any]], *,
                   top_k: int, max_length: int | None, loss_on: str, shard_size: int,
                   teacher_model: Any = None) -> dict[str, Any]:
    """The settings a cache records and compares on a rerun (``teacher_model``: None leaves it out)."""
    from .tokenizer import load_tokenizer

    t, s = load_tokenizer(teacher_tokenizer), load_tokenizer(student_tokenizer)
    h = hashlib.sha256()
    for i, ex in enumerate(examples):
        h.update(_example_json(ex, i).encode("utf-8") + b"\n")
    settings = {
        "teacher_tokenizer": {"name": t.name, "fingerprint": t.fingerprint, "vocab_size": t.vocab_size},
        "student_tokenizer": {"name": s.name, "fingerprint": s.fingerprint, "vocab_size": s.vocab_size},
        "top_k": top_k, "k": min(top_k, t.vocab_size), "max_length": max_length, "loss_on": loss_on,
        "num_examples": len(examples), "examples_sha256": h.hexdigest(), "shard_size": shard_size,
    }
    if teacher_model is not None:
        settings["teacher_model"] = _model_digest(teacher_model)
    return settings


def settings_mismatch(manifest: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """What differs between a cache's manifest and ``settings`` (keys absent from ``settings`` are not compared)."""
    out = []
    for key, words in _COMPARED.items():
        if key not in settings:
            continue
        old, new = manifest.get(key), settings[key]
        if key.endswith("_tokenizer"):
            old, new = (old or {}).get("fingerprint"), new["fingerprint"]
            words += f" fingerprint ({manifest.get(key, {}).get('name')!r} vs {settings[key]['name']!r})"
        if old != new:
            out.append(f"{words}: cache {old!r}, now {new!r}")
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the cache folder ``path``; ValueError naming the file and the fix when missing or corrupt."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a teacher cache: it has no {MANIFEST}; make one with `xtok-kd "
                         f"cache-teacher ... -o {path}`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is corrupt ({type(err).__name__}: {err}); {_FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} is not a teacher-cache manifest (no format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{str(file)!r} has format version {manifest.get('version')!r}; this xtok_kd reads version "
                         f"{VERSION}: rebuild the cache with this version (--overwrite)")
    keys = ("file", "start", "stop", "tokens", "bytes", "sha256")
    shards = manifest.get("shards")
    if not (isinstance(shards, list) and all(isinstance(e, dict) and all(k in e for k in keys) for e in shards)
            and all(isinstance(manifest.get(k), int) for k in ("num_examples", "k"))
            and all(isinstance(manifest.get(f"{side}_tokenizer"), dict) for side in ("teacher", "student"))):
        raise ValueError(f"{str(file)!r} is corrupt (missing or malformed fields); {_FIX}")
    return manifest


def cache_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a cache may not be written into ``path`` (a file; a folder with files that is not a cache), or None."""
    path = Path(path)
    if not path.exists():
        if any(p.is_file() for p in path.parents):
            return f"{str(path)!r}: a part of it is a file, not a folder; choose another folder"
        return None
    if not path.is_dir():
        return f"{str(path)!r} is a file; pass a folder (new or empty) for the cache"
    foreign = sorted(e.name for e in os.scandir(path) if not _OURS.match(e.name))
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            is_cache = json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            is_cache = not foreign  # a corrupt manifest among our own files only: rebuilt on the next run
        if not is_cache:
            foreign.insert(0, MANIFEST)
    if foreign:
        return (f"{str(path)!r} is not a teacher cache and holds other files ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); it is never overwritten, even with --overwrite: choose a "
                "new or empty folder")
    return None


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _shard_problem(path: Path, entry: Mapping[str, Any], k: int, *, verify: bool) -> str | None:
    """Why the shard file of a manifest ``entry`` cannot be used (missing, truncated, corrupt, other arrays)."""
    file = path / entry["file"]
    if not file.is_file():
        return f"shard {str(file)!r} is missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        return f"shard {str(file)!r} has {size} bytes but the manifest says {entry['bytes']} (truncated or replaced)"
    if verify and _sha256(file) != entry["sha256"]:
        return f"shard {str(file)!r} is corrupt: its sha256 differs from the manifest's"
    from safetensors import safe_open

    examples, tokens = entry["stop"] - entry["start"], entry["tokens"]
    want = {"input_ids": ("I32", [tokens]), "topk_ids": ("I32", [tokens, k]), "topk_logprobs": ("F32", [tokens, k]),
            "offsets": ("I64", [examples + 1]), "example_offsets": ("I64", [examples + 1])}
    try:
        with safe_open(str(file), "numpy") as f:
            got = {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in want}
            if got != want or int(f.get_slice("offsets")[examples:][0]) != tokens:
                return f"shard {str(file)!r} holds arrays {got} that disagree with the manifest ({want})"
    except Exception as err:  # noqa: BLE001  (SafetensorError and friends: any unreadable file is corrupt)
        return f"shard {str(file)!r} cannot be read ({type(err).__name__}: {err})"
    return None


# ---------------------------------------------------------------------- writing
def _save_tokenizer(out: Path, view: Any) -> None:
    """Save the teacher tokenizer into ``out/teacher_tokenizer`` (through a temp folder, then renamed)."""
    target = out / TOKENIZER_DIR
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{TOKENIZER_DIR}.tmp-"))
    try:
        view.hf.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(file: Path, data: Mapping[str, Any]) -> None:
    write_atomically(str(file), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1), encoding="utf-8"),
                     replace=True)


def _start(out: Path, settings: dict[str, Any], *, overwrite: bool, resume: bool) -> dict[str, Any]:
    """The manifest to continue from: verified finished shards of a matching cache, or a fresh one."""
    problem = cache_dir_problem(out)
    if problem is not None:
        raise ValueError(problem)
    try:
        old = read_manifest(out) if (out / MANIFEST).is_file() else None
    except ValueError as err:
        logger.warning("xtok_kd: %s; rebuilding the cache", err)
        old = None
    if old is not None and overwrite:
        for entry in os.scandir(out):
            if entry.name != LOCK and _OURS.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry.path)
            elif entry.name != LOCK and _OURS.match(entry.name):
                os.unlink(entry.path)
        old = None
    if old is not None:
        diff = settings_mismatch(old, settings)
        if diff:
            raise ValueError(f"{str(out)!r} holds a teacher cache made with other settings: {'; '.join(diff)}. Fix: "
                             "write to another folder (-o), or replace this cache with --overwrite (overwrite=True)")
    manifest = {"format": FORMAT, "version": VERSION, **settings, "shards": [], "tokens": 0, "complete": False}
    for entry in (old or {}).get("shards", []) if resume else []:
        problem = _shard_problem(out, entry, settings["k"], verify=True)
        if problem is None:
            manifest["shards"].append(entry)
        else:
            logger.warning("xtok_kd: %s; recomputing it", problem)
    kept = {e["file"] for e in manifest["shards"]}
    for entry in os.scandir(out):  # shards no manifest vouches for (written before a kill) are never read
        if entry.name.startswith("shard-") and _OURS.match(entry.name) and entry.name not in kept:
            os.unlink(entry.path)
        elif entry.name.startswith(f".{TOKENIZER_DIR}.tmp-"):  # a killed run's half-saved tokenizer (we hold the lock)
            shutil.rmtree(entry.path, ignore_errors=True)
    manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
    manifest["complete"] = len(manifest["shards"]) == -(-settings["num_examples"] // settings["shard_size"])
    return manifest


def _run_shard(model: Any, collator: Any, examples: Sequence[Mapping[str, Any]], first: int, *, batch_size: int,
               k: int, vocab: int, bar: Any, caught: list[str]) -> dict[str, np.ndarray]:
    """Teacher ids and top-k of ``examples`` (the ones at ``first``...), concatenated (see the module docstring)."""
    device = next(iter(model.parameters())).device
    ids, top, lps, lengths = [], [], [], []
    for a in range(0, len(examples), batch_size):
        chunk = examples[a:a + batch_size]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                batch = collator(chunk)
            except ValueError as err:
                raise ValueError(f"examples {first + a} to {first + a + len(chunk) - 1}: {err}") from None
        caught += [str(w.message) for w in seen]
        t_ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        n = mask.sum(1).tolist()
        if t_ids.shape[1]:
            with torch.no_grad():
                logits = model(input_ids=t_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                b_top, b_lp = teacher_topk(logits, k, vocab)
                del logits
            b_top, b_lp = b_top.cpu(), b_lp.cpu()
        for b, length in enumerate(n):
            ids.append(t_ids[b, :length].numpy())
            top.append(b_top[b, :length].numpy() if length else np.zeros((0, k), np.int64))
            lps.append(b_lp[b, :length].numpy() if length else np.zeros((0, k), np.float32))
            lengths.append(length)
        bar.update(len(chunk))
    return {"input_ids": np.concatenate(ids).astype(np.int32), "topk_ids": np.concatenate(top).astype(np.int32),
            "topk_logprobs": np.ascontiguousarray(np.concatenate(lps), dtype=np.float32),
            "offsets": np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)}


def _write_shard(out: Path, index: int, start: int, arrays: dict[str, np.ndarray], texts: list[str]) -> dict:
    from safetensors.numpy import save_file

    blobs = [t.encode("utf-8") for t in texts]
    arrays["examples"] = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    arrays["example_offsets"] = np.concatenate(([0], np.cumsum([len(b) for b in blobs]))).astype(np.int64)
    file = out / f"shard-{index:05d}.safetensors"
    digest = {}

    def write(tmp: str) -> None:
        # one metadata key: safetensors writes several in a random order, and shards must be byte-reproducible
        save_file(arrays, tmp, metadata={FORMAT: json.dumps({"version": VERSION, "start": start})})
        digest["sha256"] = _sha256(tmp)

    write_atomically(str(file), write, replace=True)
    return {"file": file.name, "start": start, "stop": start + len(texts), "tokens": int(arrays["offsets"][-1]),
            "bytes": file.stat().st_size, "sha256": digest["sha256"]}


def write_teacher_cache(
    teacher_model: Any, teacher_tokenizer: Any, student_tokenizer: Any, examples: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike[str], *, top_k: int = 64, max_length: int | None = None, loss_on: str = "all",
    batch_size: int = 8, shard_size: int = 1024, teacher_name: str | None = None, progress: bool = True,
    resume: bool = True, overwrite: bool = False,
) -> Path:
    """Run ``teacher_model`` over ``examples`` once and save its top-k next-token log-probabilities.

    The teacher ids are the :class:`~xtok_kd.CrossTokenizerCollator`'s (same ``max_length`` and ``loss_on``), so
    :func:`collate_teacher_topk` can check them at training time. The teacher runs in eval mode, without gradients,
    on its own device and dtype; its top-k is :func:`teacher_topk` of its logits.

    Args:
        teacher_model: a causal LM (``model(input_ids=, attention_mask=).logits`` is ``(B, L, >= Vt)``).
        teacher_tokenizer / student_tokenizer: anything :func:`~xtok_kd.load_tokenizer` takes.
        examples: dicts with ``"text"`` or ``"messages"`` (stored in the cache, which needs no data file later).
        output_dir: the cache folder (created; a folder with other files is refused).
        top_k: ``k`` (clamped to the teacher vocabulary); max_length / loss_on: as the collator's.
        batch_size: examples per teacher forward; shard_size: examples per shard file.
        teacher_name: recorded in the manifest. progress: a tqdm bar over examples.
        resume: keep the verified shards of an interrupted cache made with the same settings (False: recompute).
        overwrite: replace a cache made with other settings (a folder that is not a cache is never replaced).

    Returns:
        ``output_dir`` as a Path. Raises ValueError for bad arguments, a cache of other settings, a folder that is
        not a cache, or another process writing the same folder.
    """
    from filelock import FileLock, Timeout
    from tqdm.auto import tqdm

    from .data import CrossTokenizerCollator
    from .losses.module import max_padding

    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to cache: pass at least one {'text': ...} or {'messages': [...]} dict")
    collator = CrossTokenizerCollator(teacher_tokenizer, student_tokenizer, max_length=max_length, loss_on=loss_on)
    vocab = collator.teacher.vocab_size
    width = getattr(getattr(teacher_model, "config", None), "vocab_size", None)
    if isinstance(width, int) and not vocab <= width <= vocab + max_padding(vocab):
        raise ValueError(f"the teacher model has {width} output columns but the teacher tokenizer "
                         f"{collator.teacher.name!r} has {vocab} ids: it is not the model's tokenizer; pass the "
                         "teacher model's own tokenizer")
    texts = [_example_json(ex, i) for i, ex in enumerate(examples)]
    settings = cache_settings(collator.teacher, collator.student, examples, top_k=top_k, max_length=max_length,
                              loss_on=loss_on, shard_size=shard_size, teacher_model=teacher_model)
    out = Path(output_dir)
    problem = cache_dir_problem(out)
    if problem is not None:
        raise ValueError(problem)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(str(out / LOCK), timeout=0).acquire()
    except Timeout:
        raise ValueError(f"another process is writing the cache {str(out)!r} (lock {str(out / LOCK)!r}); wait for "
                         "it to finish or choose another folder") from None
    with lock:
        remove_stale_temps(out)
        manifest = _start(out, settings, overwrite=overwrite, resume=resume)
        manifest["teacher_name"] = teacher_name
        _write_json(out / MANIFEST, manifest)
        _save_tokenizer(out, collator.teacher)
        k, ranges = settings["k"], [(a, min(a + shard_size, len(examples))) for a in range(0, len(examples),
                                                                                         shard_size)]
        done = {e["start"] for e in manifest["shards"]}
        if done:
            logger.info("xtok_kd: %s: %d of %d shards already done, verified and kept", out, len(done), len(ranges))
        caught: list[str] = []
        was_training = getattr(teacher_model, "training", False)
        teacher_model.eval()
        bar = tqdm(total=len(examples), initial=sum(b - a for a, b in ranges if a in done), unit="ex",
                   desc="teacher top-k", disable=not progress)
        try:
            for index, (a, b) in enumerate(ranges):
                if a in done:
                    continue
                arrays = _run_shard(teacher_model, collator, examples[a:b], a, batch_size=batch_size, k=k,
                                    vocab=vocab, bar=bar, caught=caught)
                manifest["shards"] = sorted([*manifest["shards"], _write_shard(out, index, a, arrays, texts[a:b])],
                                            key=lambda e: e["start"])
                manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
                manifest["complete"] = len(manifest["shards"]) == len(ranges)
                _write_json(out / MANIFEST, manifest)
        finally:
            bar.close()
            teacher_model.train(was_training)
        if caught:
            warnings.warn(f"the collator warned {len(caught)} time(s) while caching; the first: {caught[0]}",
                          stacklevel=2)
    return out


# ---------------------------------------------------------------------- reading
class TeacherCache(torch.utils.data.Dataset):
    """A finished teacher cache as a dataset: row ``i`` is example ``i`` with its cached teacher top-k.

    ``cache[i]`` is ``{**example, "teacher_input_ids_cached": (n,) int64, "teacher_topk_ids": (n, k) int64,
    "teacher_topk_logprobs": (n, k) float32}`` (numpy arrays, n = the example's teacher tokens after truncation).
    Shards are read lazily (memory-mapped slices of at most ``max_open_shards`` open files).

    Args:
        path: the cache folder.
        teacher / student: tokenizers to check against the cache (:meth:`check_pair`); None: not checked.
        verify: check every shard's sha256 on open (sizes and array shapes are always checked).

    Raises:
        ValueError: no or a corrupt manifest; an unfinished cache; a missing, truncated, corrupt or inconsistent
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
            from .tokenizer import load_tokenizer

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
        from .tokenizer import load_tokenizer

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
        else:
            ids, top, lps = np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return {**example, "teacher_input_ids_cached": ids, "teacher_topk_ids": top, "teacher_topk_logprobs": lps}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: open handles are not picklable
        return {**self.__dict__, "_open": OrderedDict()}


def collate_teacher_topk(examples: Sequence[Mapping[str, Any]], teacher_input_ids: torch.Tensor,
                         teacher_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad cached rows' top-k to the collated batch, checking the cached teacher ids against the collator's.

    Args:
        examples: ``B`` rows of a :class:`TeacherCache` (in the batch's order).
        teacher_input_ids / teacher_attention_mask: ``(B, Lt)`` from the collator.

    Returns:
        ``ids`` ``(B, Lt, k)`` int64 (empty slots ``-1``) and ``logprobs`` ``(B, Lt, k)`` float32 (empty ``-inf``),
        ready for ``TeacherTopK(ids, logprobs)``.

    Raises:
        ValueError: a row without a cached top-k, or whose cached teacher ids differ from the collator's.
    """
    ids_in, mask = torch.as_tensor(teacher_input_ids), torch.as_tensor(teacher_attention_mask).bool()
    if ids_in.dim() != 2 or ids_in.shape != mask.shape or ids_in.shape[0] != len(examples):
        raise ValueError(f"teacher_input_ids {tuple(ids_in.shape)} and teacher_attention_mask {tuple(mask.shape)} "
                         f"must both be (B, Lt) with B = {len(examples)} examples")
    if not examples or any("teacher_topk_ids" not in ex for ex in examples):
        raise ValueError("every example needs 'teacher_topk_ids' and 'teacher_topk_logprobs' (rows of a "
                         "TeacherCache)")
    k = int(np.shape(examples[0]["teacher_topk_ids"])[-1])
    batch, length = ids_in.shape
    ids = torch.full((batch, length, k), -1, dtype=torch.long)
    logprobs = torch.full((batch, length, k), float("-inf"), dtype=torch.float32)
    for b, ex in enumerate(examples):
        want = ids_in[b][mask[b]].cpu()
        cached = torch.as_tensor(np.asarray(ex["teacher_input_ids_cached"]), dtype=torch.long)
        top, lps = torch.as_tensor(ex["teacher_topk_ids"]), torch.as_tensor(ex["teacher_topk_logprobs"])
        if cached.shape != want.shape or not torch.equal(cached, want):
            where = (f"lengths differ: cached {cached.shape[0]}, collated {want.shape[0]}"
                     if cached.shape != want.shape else "same length, other ids")
            raise ValueError(f"example {b} of the batch: its cached teacher ids differ from the collator's ({where}). "
                             "The cache was likely made with another max_length, teacher tokenizer or loss_on; use the "
                             "collator settings in the cache's manifest, or rebuild the cache")
        if top.shape != (want.shape[0], k) or lps.shape != top.shape:
            raise ValueError(f"example {b} of the batch: top-k arrays {tuple(top.shape)} / {tuple(lps.shape)}, "
                             f"expected ({want.shape[0]}, {k})")
        pos = torch.nonzero(mask[b].cpu(), as_tuple=True)[0]
        ids[b, pos], logprobs[b, pos] = top.long(), lps.float()
    return ids, logprobs
