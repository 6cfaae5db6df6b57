"""Writing files without losing any: a recognisable temp file beside the target, renamed into place.

A write goes to ``.{name}.xtok-tmp-{host}-{pid}-{random}`` in the target's folder. The temp file gets the
permissions any new file gets under the process umask (``0o666 & ~umask``), is flushed to disk, and is renamed over
the target (``replace=True``) or linked to it only if nothing is there (``replace=False``). Whatever fails on the
way, the temp file is removed. Temp files that a killed process left (same host, process gone) or that are older
than :data:`STALE_AFTER_S` are removed by the next write or cache use in that folder; nothing else is touched.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
import time
from typing import Callable

__all__ = ["STALE_AFTER_S", "current_umask", "name_problem", "probe_writable", "remove_stale_temps", "temp_path",
           "write_atomically"]

STALE_AFTER_S = 3600.0
_MARK = ".xtok-tmp-"
_TEMP = re.compile(r"^\..*\.xtok-tmp-(?P<host>[A-Za-z0-9_]*)-(?P<pid>[0-9]{1,10})-[0-9a-f]{12}$", re.DOTALL)
# xtok_kd 0.1.0 cached tables through ``{entry}.tmp{pid}``: only that exact cache-entry shape is recognised
_LEGACY = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}-v[0-9]+-k[0-9]+-w[0-9]+\.safetensors\.tmp[0-9]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


def temp_path(path: str) -> str:
    """A new temp-file name beside ``path``: ``.{name}.xtok-tmp-{host}-{pid}-{random}`` (name cut to 100 bytes)."""
    folder, name = os.path.split(os.path.abspath(path))
    short = os.fsdecode(os.fsencode(name)[:100]) if len(os.fsencode(name)) > 100 else name
    return os.path.join(folder, f".{short}{_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(6)}")


def name_problem(path: str) -> str | None:
    """Why the last part of ``path`` cannot be a file name on its file system (too long), or None."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        limit = os.pathconf(folder if os.path.isdir(folder) else os.sep, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(name))
    if size > limit:
        return f"its file name is {size} bytes long, more than the {limit} this file system allows; use a shorter name"
    return None


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0 or os.name == "nt":
        return True  # not a process id this module writes, or no harmless probe (Windows): the age rule decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # exists but belongs to another user, or cannot be asked: assume alive
    return True


def remove_stale_temps(folder: str | os.PathLike[str], *, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove this module's temp files in ``folder`` whose writer died or that are older than ``max_age_s``.

    A temp file of a live process on this host, or of another host (a shared folder), is kept until it is old.
    Returns the removed paths; errors (folder missing, not allowed) remove nothing and raise nothing.
    """
    removed: list[str] = []
    now = time.time()
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None and _LEGACY.match(entry.name) is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        dead = match is not None and match["host"] == host and not _pid_alive(int(match["pid"]))
        if dead or now - info.st_mtime > max_age_s:
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(entry.path)
    return removed


def probe_writable(folder: str) -> None:
    """Raise ``PermissionError``/``OSError`` unless a file can be created in ``folder`` (tries one, removes it)."""
    probe = temp_path(os.path.join(folder, "probe"))
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(probe)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_atomically(
    path: str,
    write: Callable[[str], None],
    *,
    replace: bool,
    check_target: Callable[[], None] | None = None,
) -> str:
    """Write ``path`` through a temp file in its folder; returns ``path``.

    Args:
        path: the target; its folder must exist.
        write: called with the temp file's path (the file exists, empty); writes the content there.
        replace: rename over an existing target. When False an existing target raises ``FileExistsError`` and is
            left untouched (the temp file is hard-linked into place, so no race can clobber a file that appears
            meanwhile; where links are not supported, the target is checked just before the rename).
        check_target: called just before a replacing rename; raises to refuse the target found there.

    Raises whatever ``write``, ``check_target`` or the file system raise; the temp file is always removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(folder)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # what a plain open() would have given it
        _fsync(tmp)
        if replace:
            if check_target is not None:
                check_target()
            os.replace(tmp, path)
        else:
            _link_into_place(tmp, path)
    finally:
        _remove(tmp)  # already renamed away on success, or still there after a link or a failure
    return path


def _link_into_place(tmp: str, path: str) -> None:
    def exists() -> FileExistsError:
        return FileExistsError(f"{path!r} appeared while it was being written; it was left untouched")

    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise exists() from None
    except OSError:
        pass  # no hard links on this file system
    if os.path.lexists(path):
        raise exists()
    os.replace(tmp, path)
