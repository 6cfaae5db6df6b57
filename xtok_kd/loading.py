"""``load_tokenizer``: a :class:`~xtok_kd.tokenizer.TokenizerView` from whatever names a tokenizer (a folder, a
``tokenizer.json``, an embedded name, a hub id, a ``transformers`` tokenizer), with errors that name the value
and what to pass instead."""

from __future__ import annotations

import json
import os
from typing import Any

from .tokenizer import TokenizerView

__all__ = ["load_tokenizer"]

_HUB_EXAMPLE = "'Qwen/Qwen2.5-0.5B'"


def _other_options(name: str = "") -> str:
    """The fix to name in a load error: what load_tokenizer takes, and the closest embedded name if any."""
    from difflib import get_close_matches

    from .assets import EMBEDDED_TOKENIZERS

    bare = name and not any(sep in name for sep in "/\\")
    close = get_close_matches(name.lower(), EMBEDDED_TOKENIZERS, n=1, cutoff=0.6) if bare else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"pass a folder containing tokenizer.json, a hub id like {_HUB_EXAMPLE}, or an embedded name: "
            f"{', '.join(EMBEDDED_TOKENIZERS)}{guess}")


def _looks_like_path(name: str) -> bool:
    """A name meant as a local path (it cannot be a hub id): absolute, relative with ``./``, ``~``, a trailing
    or doubled separator, more than one ``/``, or a Windows separator."""
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(tuple(seps))
            or name.count("/") > 1 or ("\\" in name and os.sep == "\\") or any(sep * 2 in name for sep in seps))


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` is a well-formed Hugging Face hub id (``"name"`` or ``"namespace/name"``)."""
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # HFValidationError (a ValueError), or no huggingface_hub: not a usable hub id
        return False
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _folder_error(folder: str, err: BaseException) -> ValueError:
    """Why a local folder did not load: a missing or broken tokenizer.json, named with the fix."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        found = sorted(os.listdir(folder))
        holds = "it is empty" if not found else (
            f"it holds {', '.join(found[:8])}{', ...' if len(found) > 8 else ''}; transformers said: "
            f"{' '.join(str(err).split())[:300]}")
        return ValueError(
            f"could not load tokenizer: folder {folder!r} has no tokenizer.json ({holds}). "
            "xtok_kd needs the fast tokenizer's tokenizer.json: write it with "
            "AutoTokenizer.from_pretrained(<model>).save_pretrained(folder), or " + _other_options()
        )
    try:
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as bad:
        return ValueError(
            f"could not load tokenizer: {path!r} is not valid JSON ({_first_line(bad)}), so it is not a valid "
            "tokenizers JSON file; re-create it with tokenizer.save_pretrained(folder) from a fast tokenizer, or "
            + _other_options()
        )
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(path)
    except Exception as bad:  # the tokenizers library's own parse error, whatever its type
        return ValueError(
            f"could not load tokenizer: {path!r} is not a valid tokenizers JSON file ({_first_line(bad)}); it "
            "must be the tokenizer.json that a fast tokenizer writes: re-create it with "
            "tokenizer.save_pretrained(folder), or " + _other_options()
        )
    return ValueError(
        f"could not load tokenizer: folder {folder!r} has a valid tokenizer.json but transformers failed "
        f"({_first_line(err)}); check tokenizer_config.json and special_tokens_map.json there, or "
        + _other_options()
    )


def load_tokenizer(tokenizer: Any, **kwargs: Any) -> TokenizerView:
    """A :class:`TokenizerView` from a local folder, a hub id, a ``transformers`` tokenizer or a view.

    Args:
        tokenizer: a folder containing ``tokenizer.json`` (and ``tokenizer_config.json``; a path to the
            ``tokenizer.json`` file itself works too), the name of an embedded tokenizer (``"qwen2.5"``,
            ``"mistral"``, ``"gpt2"``; see ``xtok_kd/assets``), a Hugging Face hub id such as
            ``"Qwen/Qwen2.5-0.5B-Instruct"`` (downloaded by ``transformers``), a fast ``transformers`` tokenizer
            object, or a :class:`TokenizerView` (returned as is).
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (``revision=``, ``token=``, ...).

    Raises:
        ValueError: the name is no folder, embedded name or loadable hub id, or the folder holds no valid
            ``tokenizer.json``; the message names the value and what to pass instead.
    """
    if isinstance(tokenizer, TokenizerView):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        name = os.fspath(tokenizer)
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise ValueError(f"could not load tokenizer {name!r}: that is no name; " + _other_options())
        if os.path.isfile(name):
            if os.path.basename(name) != "tokenizer.json":
                raise ValueError(f"could not load tokenizer: {name!r} is a file, not a tokenizer folder; "
                                 + _other_options())
            name = os.path.dirname(name) or "."
        if os.path.isdir(name):
            try:
                hf = AutoTokenizer.from_pretrained(name, **kwargs)
            except Exception as err:  # anything a user's folder can make transformers raise
                raise _folder_error(name, err) from err
            return TokenizerView(hf, name=os.fspath(tokenizer))
        from .assets import embedded_tokenizer

        embedded = embedded_tokenizer(name)
        if embedded is not None:
            return TokenizerView(AutoTokenizer.from_pretrained(str(embedded), **kwargs), name=name)
        if isinstance(tokenizer, os.PathLike) or _looks_like_path(name):
            raise ValueError(f"could not load tokenizer: no such folder {name!r}; " + _other_options(name))
        if not _is_hub_id(name):
            raise ValueError(
                f"could not load tokenizer {name!r}: it is not a folder, an embedded name or a valid hub id (hub "
                "ids are 'name' or 'namespace/name' of letters, digits, '-', '_' and '.'); " + _other_options(name)
            )
        try:
            hf = AutoTokenizer.from_pretrained(name, **kwargs)
        except Exception as err:  # network, missing or gated repo, or a repo without a usable tokenizer
            raise ValueError(
                f"could not load tokenizer {name!r}: it could not be downloaded or found on the Hugging Face hub "
                f"({_first_line(err)}); check the id, your network (or HF_HUB_OFFLINE with a cached copy) and "
                "token= for gated repos, or " + _other_options(name).replace("pass a folder", "pass instead a folder")
            ) from err
        return TokenizerView(hf, name=name)
    if hasattr(tokenizer, "backend_tokenizer") or hasattr(tokenizer, "encode"):
        return TokenizerView(tokenizer)
    raise TypeError(
        f"load_tokenizer() takes a path, a hub id, a transformers tokenizer or a TokenizerView; got "
        f"{type(tokenizer).__name__}: {tokenizer!r:.80}"
    )
