"""Writing a teacher cache: shards written atomically, resumable, refused on changed settings."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..vocab.files import remove_stale_temps, write_atomically
from .format import (
    _COMPARED,
    _OURS,
    FORMAT,
    LOCK,
    MANIFEST,
    TOKENIZER_DIR,
    VERSION,
    _example_json,
    _sha256,
    _shard_problem,
    cache_dir_problem,
    cache_settings,
    read_manifest,
    settings_mismatch,
    stored_version,
    version_message,
)
from .topk import teacher_topk

logger = logging.getLogger(__name__)

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
    found = stored_version(out)
    if found is not None and not overwrite:  # its shards lack arrays this version needs: replaced on request only
        raise ValueError(version_message(out, found))
    try:
        old = read_manifest(out) if (out / MANIFEST).is_file() and found is None else None
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
    """Teacher ids, top-k and next-token log-probs of ``examples`` (the ones at ``first``...), concatenated (see the
    module docstring)."""
    device = next(iter(model.parameters())).device
    ids, top, lps, nxt, lengths = [], [], [], [], []
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
                b_top, b_lp, b_next = teacher_topk(logits, k, vocab, input_ids=t_ids, attention_mask=mask)
                del logits
            b_top, b_lp, b_next = b_top.cpu(), b_lp.cpu(), b_next.cpu()
        for b, length in enumerate(n):
            ids.append(t_ids[b, :length].numpy())
            top.append(b_top[b, :length].numpy() if length else np.zeros((0, k), np.int64))
            lps.append(b_lp[b, :length].numpy() if length else np.zeros((0, k), np.float32))
            nxt.append(b_next[b, :length].numpy() if length else np.zeros(0, np.float32))
            lengths.append(length)
        bar.update(len(chunk))
    return {"input_ids": np.concatenate(ids).astype(np.int32), "topk_ids": np.concatenate(top).astype(np.int32),
            "topk_logprobs": np.ascontiguousarray(np.concatenate(lps), dtype=np.float32),
            "next_token_logprobs": np.ascontiguousarray(np.concatenate(nxt), dtype=np.float32),
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
    resume: bool = True, overwrite: bool = False, notes: Mapping[str, Any] | None = None,
) -> Path:
    """Run ``teacher_model`` over ``examples`` once and save its top-k next-token log-probabilities, and the
    log-probability of each actual next token.

    The teacher ids are the :class:`~xtok_kd.CrossTokenizerCollator`'s (same ``max_length`` and ``loss_on``), so
    :func:`collate_teacher_topk` can check them at training time. The teacher runs in eval mode, without gradients,
    on its own device and dtype; its values are :func:`teacher_topk` of its logits and input ids.

    Args:
        teacher_model: a causal LM (``model(input_ids=, attention_mask=).logits`` is ``(B, L, >= Vt)``).
        teacher_tokenizer / student_tokenizer: anything :func:`~xtok_kd.load_tokenizer` takes.
        examples: dicts with ``"text"`` or ``"messages"`` (stored in the cache, which needs no data file later).
        output_dir: the cache folder (created; a folder with other files is refused).
        top_k: ``k`` (clamped to the teacher vocabulary); max_length / loss_on: as the collator's.
        batch_size: examples per teacher forward; shard_size: examples per shard file.
        teacher_name: recorded in the manifest. progress: a tqdm bar over examples.
        notes: more JSON-serialisable entries for the manifest, e.g. how the examples were made (``xtok-kd
            cache-teacher --add-teacher-text`` records ``{"teacher_text": {...}}``); recorded, not compared (the
            examples' digest is), and they may not replace an entry the cache writes itself.
        resume: keep the verified shards of an interrupted cache made with the same settings (False: recompute).
        overwrite: replace a cache made with other settings or by another format version (a folder that is not
            a cache is never replaced).

    Returns:
        ``output_dir`` as a Path. Raises ValueError for bad arguments, a cache of other settings or format version
        (without ``overwrite``), a folder that is not a cache, or another process writing the same folder.
    """
    from filelock import FileLock, Timeout
    from tqdm.auto import tqdm

    from ..data import CrossTokenizerCollator
    from ..losses.module import max_padding

    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    notes = dict(notes or {})
    taken = sorted(set(notes) & {"format", "version", "shards", "tokens", "complete", "teacher_name", "k",
                                 *_COMPARED})
    if taken:
        raise ValueError(f"notes may not replace the manifest's own entries {taken}; give them other names")
    try:
        json.dumps(notes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"notes must be JSON-serialisable ({err}); keep str/number/list/dict values") from None
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
        manifest.update(notes)
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
