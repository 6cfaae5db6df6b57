"""Training examples from what users have: a text file, JSON lines, a folder of text files, or a ``datasets`` name.

:func:`load_examples` turns a source into the rows :class:`~xtok_kd.integrations.CrossTokenizerKDTrainer` takes,
``{"text": str}``, ``{"prompt": str, "completion": str}`` (the loss on the completion only) or
``{"messages": [{"role": str, "content": str}, ...]}``:

* a ``.txt`` file, or a folder of them (read recursively, in path order): cut into passages of about
  ``chars_per_example`` characters at paragraph (blank line) boundaries; a longer paragraph is cut at line
  boundaries, a longer line at a space, and a line without one between characters, never inside a character or
  between a character and the combining marks, joiners or variation selectors that follow it;
* a ``.jsonl`` file (one JSON object a line) or a ``.json`` file (a list of objects, one object, or JSON lines),
  each row with a ``text`` string, a ``messages`` list (these two field names are options), or, without a text
  field, ``prompt`` and ``completion`` strings (TRL's prompt-completion rows);
* a ``.parquet`` / ``.csv`` file, a folder written by ``Dataset.save_to_disk``, a folder of data files, or a hub
  name: read with ``datasets`` (``split``, default ``"train"``).

Bad rows are skipped and counted by reason (:data:`SKIP_REASONS`), never a crash; a source where every row is bad
raises ``ValueError`` naming the counts and the expected format.
"""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SKIP_REASONS", "load_examples", "source_problem", "split_held_out", "split_passages"]

#: Why a row is skipped, in the order they are reported.
SKIP_REASONS = ("bad_json", "no_text_or_messages", "empty_text", "malformed_messages", "no_assistant_turn")
_LOSS_ON = ("all", "assistant")
_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json")
_DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_FORMAT = ("rows must be JSON objects with a non-empty 'text' string, a 'messages' list of "
           "{'role': str, 'content': str} objects, or 'prompt' and non-empty 'completion' strings")


# ---------------------------------------------------------------------- checking a source without reading it
def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "~", os.sep)) or (os.altsep is not None and os.altsep in source)
            or source.count("/") > 1 or Path(source).suffix.lower() in
            (*_TEXT_SUFFIXES, *_JSON_SUFFIXES, *_DATASETS_SUFFIXES))


def source_problem(source: Any, *, option: str = "data") -> str | None:
    """Why ``source`` cannot be a data source, found without reading it (None: it may be; loading decides).

    ``option`` names it in the message (``"--data"`` on the command line).
    """
    kinds = ("a .txt, .jsonl or .json file, a folder of .txt files, a .parquet/.csv file or a `datasets` name "
             "(e.g. ./corpus.txt)")
    if not isinstance(source, (str, os.PathLike)):
        return f"{option} must be a path or a dataset name, got {type(source).__name__}"
    source = os.fspath(source)
    if not source.strip() or "\0" in source:
        return f"{option} {source!r} is no path or name; pass {kinds}"
    path = Path(source).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{option} {source!r}: the folder cannot be read (permissions); pass a readable folder"
        return None
    if path.exists():
        if not path.is_file():
            return f"{option} {source!r} is not a regular file; pass {kinds}"
        suffix = path.suffix.lower()
        if suffix not in (*_TEXT_SUFFIXES, *_JSON_SUFFIXES, *_DATASETS_SUFFIXES):
            return (f"{option} {source!r}: unknown file type {suffix or '(no extension)'!r}; pass a .txt file (plain "
                    "text), a .jsonl/.json file (rows with 'text' or 'messages'), or a .parquet/.csv file (rename the "
                    "file if it is one of these)")
        if not os.access(path, os.R_OK):
            return f"{option} {source!r}: the file cannot be read (permissions); pass a readable file"
        return None
    if _looks_like_path(source):
        return f"{option} {source!r}: no such file or folder; pass {kinds}"
    return None  # a `datasets` hub name: only loading can tell


# ---------------------------------------------------------------------- plain text -> passages
def _joins_previous(ch: str) -> bool:
    """Whether ``ch`` belongs to the character before it (a cut must not fall just before ``ch``)."""
    code = ord(ch)
    return (unicodedata.category(ch) in ("Mn", "Me", "Mc")  # combining marks
            or code == 0x200D or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF  # ZWJ, variation selectors
            or 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F  # skin tones, emoji tag sequences
            or 0x1160 <= code <= 0x11FF)  # conjoining Hangul vowels and finals (NFD Korean)


def _regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def _may_cut(line: str, i: int) -> bool:
    """Whether cutting ``line`` before character ``i`` (``0 < i < len(line)``) splits no grapheme: not before a
    combining mark, joiner or selector, not after a ZWJ, not inside a flag (a pair of regional indicators)."""
    if _joins_previous(line[i]) or ord(line[i - 1]) == 0x200D:
        return False
    if _regional(line[i]) and _regional(line[i - 1]):
        run = i
        while run > 0 and _regional(line[run - 1]):
            run -= 1
        return (i - run) % 2 == 0
    return True


def _safe_cut(line: str, cut: int) -> int:
    """The nearest grapheme boundary at or before ``cut`` (after it when the window is one grapheme)."""
    for i in range(cut, 0, -1):
        if _may_cut(line, i):
            return i
    for i in range(cut + 1, len(line)):
        if _may_cut(line, i):
            return i
    return len(line)


def _split_line(line: str, size: int) -> Iterator[str]:
    """Pieces of at most about ``size`` characters: at the last space in the window when there is one in its second
    half, else between characters."""
    while len(line) > size:
        window = line[:size + 1]
        space = max(window.rfind(" "), window.rfind("\t"))
        if space > size // 2:
            head, line = line[:space].rstrip(), line[space:].lstrip()
        else:
            cut = _safe_cut(line, size)
            head, line = line[:cut], line[cut:]
        if head:
            yield head
    if line:
        yield line


def _pack(pieces: Iterable[str], size: int, sep: str) -> Iterator[str]:
    """Join consecutive pieces with ``sep`` while the result stays within ``size`` characters."""
    group: list[str] = []
    length = 0
    for piece in pieces:
        if group and length + len(sep) + len(piece) > size:
            yield sep.join(group)
            group, length = [], 0
        length += (len(sep) if group else 0) + len(piece)
        group.append(piece)
    if group:
        yield sep.join(group)


def split_passages(text: str, chars_per_example: int = 2000) -> list[str]:
    """Cut ``text`` into passages of at most about ``chars_per_example`` characters.

    Paragraphs (separated by blank lines) are packed together while they fit; a longer paragraph is cut at line
    boundaries, a longer line at a space, and a line with no space in reach between characters (never inside a
    grapheme: a combining mark, ZWJ sequence, variation selector or flag stays with its base). ``\\r\\n`` becomes
    ``\\n``; whitespace-only paragraphs are dropped.
    """
    if isinstance(chars_per_example, bool) or not isinstance(chars_per_example, int) or chars_per_example < 1:
        raise ValueError(f"chars_per_example must be an int >= 1, got {chars_per_example!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    pieces: list[str] = []
    for para in paragraphs:
        if not para.strip():
            continue
        if len(para) <= chars_per_example:
            pieces.append(para)
            continue
        lines = [piece for line in para.split("\n") for piece in _split_line(line, chars_per_example)]
        pieces.extend(_pack(lines, chars_per_example, "\n"))
    return list(_pack(pieces, chars_per_example, "\n\n"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err}); convert it (iconv -t utf-8 ...) or pass another "
                         "file") from None


# ---------------------------------------------------------------------- rows -> examples
def _example(row: Any, *, loss_on: str, text_field: str, messages_field: str) -> tuple[dict | None, str | None]:
    """``(example, None)`` for a usable row, else ``(None, reason)``."""
    if not isinstance(row, Mapping):
        return None, "no_text_or_messages"
    messages = row.get(messages_field)
    if messages is not None:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            return None, "malformed_messages"
        clean = []
        for msg in messages:
            if (not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or not msg["role"]
                    or not isinstance(msg.get("content"), str)):
                return None, "malformed_messages"
            clean.append({"role": msg["role"], "content": msg["content"]})
        if not any(m["content"].strip() for m in clean):
            return None, "empty_text"
        if loss_on == "assistant" and not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
            return None, "no_assistant_turn"
        return {"messages": clean}, None
    text = row.get(text_field)
    prompt, completion = row.get("prompt"), row.get("completion")
    if text is None and isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():  # nothing to learn from: the loss is on the completion only
            return None, "empty_text"
        return {"prompt": prompt, "completion": completion}, None
    if not isinstance(text, str):
        return None, "no_text_or_messages"
    if not text.strip():
        return None, "empty_text"
    return {"text": text}, None


def _json_rows(path: Path) -> Iterator[Any]:
    """The rows of a .jsonl/.json file; a line that is not JSON yields the marker ``_BAD_JSON``."""
    data = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError):
            whole = _NOT_ONE_DOCUMENT  # maybe JSON lines in a .json file (as `datasets` accepts)
        if isinstance(whole, list):
            yield from whole
            return
        if isinstance(whole, dict):
            yield whole
            return
        if whole is not _NOT_ONE_DOCUMENT:
            yield whole  # a JSON scalar: one row without text or messages
            return
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            yield json.loads(line.decode("utf-8-sig" if line.startswith(b"\xef\xbb\xbf") else "utf-8"))
        except (UnicodeDecodeError, ValueError):
            yield _BAD_JSON


_BAD_JSON = object()
_NOT_ONE_DOCUMENT = object()


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        import datasets.config

        return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    except Exception:  # noqa: BLE001  (datasets missing: loading below says so)
        return False


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _dataset_rows(source: str, split: str | None) -> Iterator[Any]:
    """Rows of a `datasets` source: a data file, a saved dataset folder, a folder of data files, or a hub name."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source!r} needs the datasets package: pip install datasets (or pass a .txt or "
                          ".jsonl file)") from None
    split_name = split or "train"
    path = Path(source).expanduser()
    local = path.exists()
    try:
        if path.is_file():
            ds = datasets.load_dataset(_DATASETS_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
        elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split_name not in ds:
                    raise ValueError(f"the saved dataset has no split {split_name!r}; its splits: {list(ds)} "
                                     "(choose one with split=/--data-split)")
                ds = ds[split_name]
        else:
            ds = datasets.load_dataset(str(path) if local else source, split=split_name)
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"{source!r}: {err}") from None
        raise _dataset_error(source, split_name, err, local) from None
    except Exception as err:  # noqa: BLE001  (network, missing repo, a format datasets cannot read)
        raise _dataset_error(source, split_name, err, local) from None
    if isinstance(ds, datasets.IterableDataset):  # pragma: no cover  (load_dataset(streaming=False) gives a Dataset)
        ds = list(ds)
    yield from ds


def _dataset_error(source: str, split: str, err: BaseException, local: bool) -> ValueError:
    local_hint = "pass a local .txt, .jsonl or .json file (or a folder of .txt files) instead"
    if local:
        return ValueError(f"{source!r} could not be read with `datasets` ({_first_line(err)}); {local_hint}")
    text = str(err).lower()
    offline = _hub_offline() or isinstance(err, ConnectionError) or any(
        w in text for w in ("offline", "connection", "connect", "reach", "resolve", "network", "timed out"))
    if offline:
        return ValueError(f"{source!r} is not a local file or folder, and as a hub dataset name it could not be "
                          "fetched: this machine is offline (or the hub is unreachable) and it is not in the "
                          f"`datasets` cache ({_first_line(err)}); {local_hint}")
    return ValueError(f"{source!r} is not a local file or folder, and `datasets.load_dataset({source!r}, "
                      f"split={split!r})` failed ({_first_line(err)}); check the name and split, or {local_hint}")


def load_examples(
    source: str | os.PathLike[str], *, loss_on: str = "all", chars_per_example: int = 2000, split: str | None = None,
    text_field: str = "text", messages_field: str = "messages",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read training examples from ``source`` (see the module docstring).

    Args:
        source: a ``.txt`` file or folder of them, a ``.jsonl``/``.json`` file, a ``.parquet``/``.csv`` file, a
            folder saved by ``datasets``, or a ``datasets`` hub name.
        loss_on: ``"assistant"`` also skips chat rows without a non-empty assistant turn (nothing to learn from);
            a prompt/completion row's loss is on its completion either way.
        chars_per_example: passage size for plain text.
        split: the ``datasets`` split (default ``"train"``).
        text_field / messages_field: the row fields holding the text or the conversation (examples always use the
            keys ``"text"`` / ``"messages"``; a message keeps its ``role`` and ``content`` only).

    Returns:
        ``(examples, skipped)``: ``examples`` are ``{"text": str}``, ``{"prompt": str, "completion": str}`` or
        ``{"messages": [...]}`` dicts in source order;
        ``skipped`` counts skipped rows by reason (only reasons that occurred, in :data:`SKIP_REASONS` order):
        ``bad_json`` (a line that is not JSON), ``no_text_or_messages``, ``empty_text``, ``malformed_messages``,
        ``no_assistant_turn``.

    Raises:
        ValueError: a bad argument; a source that cannot be read (naming it and what to pass instead); a source
            where every row is bad (naming the counts and the expected format) or that holds no text.
    """
    if loss_on not in _LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r} is not one of {_LOSS_ON}")
    if isinstance(chars_per_example, bool) or not isinstance(chars_per_example, int) or chars_per_example < 1:
        raise ValueError(f"chars_per_example must be an int >= 1, got {chars_per_example!r}")
    for name, value in (("text_field", text_field), ("messages_field", messages_field)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    problem = source_problem(source, option="source")
    if problem is not None:
        raise ValueError(problem)
    name = os.fspath(source)
    path = Path(name).expanduser()
    texts: list[Path] = []
    if path.is_dir():
        texts = sorted(p for p in path.rglob("*.txt") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
    elif path.is_file() and path.suffix.lower() in _TEXT_SUFFIXES:
        texts = [path]
    if texts:
        examples = [{"text": passage} for p in texts for passage in split_passages(_read_text(p), chars_per_example)]
        if not examples:
            where = f"the file {name!r}" if path.is_file() else f"the .txt files of {name!r}"
            raise ValueError(f"{where} hold no text (empty or whitespace only); pass a file with some text")
        return examples, {}
    rows: Iterable[Any]
    if path.is_file() and path.suffix.lower() in _JSON_SUFFIXES:
        rows = _json_rows(path)
    else:
        rows = _dataset_rows(name, split)
    examples, skipped = [], Counter()
    for row in rows:
        if row is _BAD_JSON:
            skipped["bad_json"] += 1
            continue
        example, reason = _example(row, loss_on=loss_on, text_field=text_field, messages_field=messages_field)
        if example is None:
            skipped[reason] += 1
        else:
            examples.append(example)
    counts = {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}
    if not examples:
        if not counts:
            raise ValueError(f"{name!r} holds no rows; {_FORMAT}")
        fields = ("" if (text_field, messages_field) == ("text", "messages") else
                  f" (here the fields are {text_field!r} / {messages_field!r})")
        assistant = (" With loss_on='assistant' each conversation needs a non-empty assistant turn."
                     if "no_assistant_turn" in counts else "")
        raise ValueError(f"every row of {name!r} was skipped ({', '.join(f'{r}: {n}' for r, n in counts.items())}): "
                         f"{_FORMAT}{fields}, e.g. {{\"text\": \"...\"}} or {{\"messages\": [{{\"role\": \"user\", "
                         f"\"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]}}.{assistant}")
    return examples, counts


def split_held_out(examples: Sequence[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Split ``examples`` into ``(train, held_out)``: ``round(len * fraction)`` examples (at least one when
    ``fraction > 0``, never all) drawn with ``random.Random(seed)``; both keep the source order. Same input, same
    split.

    Raises:
        ValueError: ``fraction`` outside ``[0, 1)``, or ``fraction > 0`` with fewer than 2 examples.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    n = len(examples)
    if fraction == 0:
        return list(examples), []
    if n < 2:
        raise ValueError(f"holding out a fraction needs at least 2 examples, got {n}")
    k = min(max(1, round(n * fraction)), n - 1)
    held = set(random.Random(seed).sample(range(n), k))
    return ([examples[i] for i in range(n) if i not in held], [examples[i] for i in range(n) if i in held])
