"""The cache folder's format: constants, settings, the manifest and the checks of shards and folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT, VERSION = "xtok_kd.teacher_cache", 2  # 2: shards add next_token_logprobs
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


def examples_sha256(examples: Sequence[Mapping[str, Any]]) -> str:
    """The digest of ``examples`` that a cache records and compares (``examples_sha256``), hex."""
    h = hashlib.sha256()
    for i, ex in enumerate(examples):
        h.update(_example_json(ex, i).encode("utf-8") + b"\n")
    return h.hexdigest()


def cache_settings(teacher_tokenizer: Any, student_tokenizer: Any, examples: Sequence[Mapping[str, Any]], *,
                   top_k: int, max_length: int | None, loss_on: str, shard_size: int,
                   teacher_model: Any = None) -> dict[str, Any]:
    """The settings a cache records and compares on a rerun (``teacher_model``: None leaves it out)."""
    from ..tokenizer import load_tokenizer

    t, s = load_tokenizer(teacher_tokenizer), load_tokenizer(student_tokenizer)
    settings = {
        "teacher_tokenizer": {"name": t.name, "fingerprint": t.fingerprint, "vocab_size": t.vocab_size},
        "student_tokenizer": {"name": s.name, "fingerprint": s.fingerprint, "vocab_size": s.vocab_size},
        "top_k": top_k, "k": min(top_k, t.vocab_size), "max_length": max_length, "loss_on": loss_on,
        "num_examples": len(examples), "examples_sha256": examples_sha256(examples), "shard_size": shard_size,
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
        raise ValueError(version_message(path, manifest.get("version")))
    keys = ("file", "start", "stop", "tokens", "bytes", "sha256")
    shards = manifest.get("shards")
    if not (isinstance(shards, list) and all(isinstance(e, dict) and all(k in e for k in keys) for e in shards)
            and all(isinstance(manifest.get(k), int) for k in ("num_examples", "k"))
            and all(isinstance(manifest.get(f"{side}_tokenizer"), dict) for side in ("teacher", "student"))):
        raise ValueError(f"{str(file)!r} is corrupt (missing or malformed fields); {_FIX}")
    return manifest


def version_message(path: str | os.PathLike[str], found: Any) -> str:
    """Why the cache ``path`` of format version ``found`` is not read, and the command that rebuilds it."""
    why = " (version 2 adds the teacher's log-probability of each next token)" if found == 1 else ""
    return (f"{str(Path(path) / MANIFEST)!r} has format version {found!r}; this xtok_kd reads version {VERSION}{why}. "
            f"Fix: rebuild the cache with `xtok-kd cache-teacher ... -o {path} --overwrite` (or write_teacher_cache("
            "..., overwrite=True))")


def stored_version(path: str | os.PathLike[str]) -> Any:
    """The format version of the cache ``path`` when it is a teacher cache of another version than ours, else None."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("version") != VERSION:
        return manifest.get("version")
    return None


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
            "next_token_logprobs": ("F32", [tokens]), "offsets": ("I64", [examples + 1]),
            "example_offsets": ("I64", [examples + 1])}
    try:
        with safe_open(str(file), "numpy") as f:
            got = {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in want}
            if got != want or int(f.get_slice("offsets")[examples:][0]) != tokens:
                return f"shard {str(file)!r} holds arrays {got} that disagree with the manifest ({want})"
    except Exception as err:  # noqa: BLE001  (SafetensorError and friends: any unreadable file is corrupt)
        return f"shard {str(file)!r} cannot be read ({type(err).__name__}: {err})"
    return None
