"""Files are never lost or left behind: options checked before work, atomic saves, temp-file cleanup, one builder
per cache entry across processes, dependencies that make every documented command work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\.xtok-tmp-|\.tmp\d+$")


def _temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if TEMP.search(p.name))


@pytest.fixture(scope="module")
def table():
    from xtok_kd.vocab import VocabAlignment

    return VocabAlignment.build("gpt2", "gpt2", neighbours=0, progress=False)


# ---------------------------------------------------------------------- 1. dependencies
def test_plot_and_lock_dependencies_are_regular_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower(): d for d in project["dependencies"]}
    assert "matplotlib" in names and "filelock" in names
    assert names["torch"].replace(" ", "") == "torch>=2.2"  # no upper bound that would pull another build
    assert not any("matplotlib" in d for d in project.get("optional-dependencies", {}).get("plot", []))


# ---------------------------------------------------------------------- 13. atomic saves leave nothing behind
@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_no_temp_file_and_keeps_the_old_table(table, tmp_path, monkeypatch, error):
    import safetensors.numpy

    from xtok_kd.vocab import VocabAlignment

    path = table.save(tmp_path / "t.safetensors")
    before = Path(path).read_bytes()
    seen = []

    def half_then_fail(arrays, filename, metadata=None):
        seen.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise error

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_fail)
    with pytest.raises(type(error)):
        table.save(path, overwrite=True)
    with pytest.raises(type(error)):
        table.save(tmp_path / "new.safetensors")
    name = os.path.basename(seen[0])
    assert name.startswith(".t.safetensors.xtok-tmp-") and f"-{os.getpid()}-" in name  # recognisable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    assert Path(path).read_bytes() == before
    assert VocabAlignment.load(path).metadata == table.metadata


def test_failed_rename_leaves_no_temp_file(table, tmp_path, monkeypatch):
    import xtok_kd.vocab.files as files

    def no_link(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "link", no_link)
    monkeypatch.setattr(files.os, "replace", no_link)
    with pytest.raises(OSError, match="Input/output"):
        table.save(tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_appears_during_the_write_is_not_clobbered(tmp_path):
    from xtok_kd.vocab.files import write_atomically

    target = tmp_path / "t.safetensors"

    def write(tmp):
        Path(tmp).write_bytes(b"ours")
        target.write_bytes(b"someone else's")

    with pytest.raises(FileExistsError, match="left untouched"):
        write_atomically(str(target), write, replace=False)
    assert target.read_bytes() == b"someone else's" and _temps(tmp_path) == []


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_files_are_cleaned_and_nothing_else(table, tmp_path):
    from xtok_kd.vocab.files import _host

    host, old = _host(), time.time() - 2 * 3600
    dead = f".t.safetensors.xtok-tmp-{host}-{_dead_pid()}-0123456789ab"
    live_old = f".t.safetensors.xtok-tmp-{host}-{os.getpid()}-0123456789ac"
    other_host = ".t.safetensors.xtok-tmp-elsewhere-1-0123456789ad"
    other_host_old = ".t.safetensors.xtok-tmp-elsewhere-2-0123456789ae"
    legacy_old = f"{'a' * 16}-{'b' * 16}-v1-k4-w8.safetensors.tmp123"
    user_files = ["notes.txt", ".hidden", "model.safetensors.tmp1", ".x.xtok-tmp-notes", "weights.safetensors"]
    for name in [dead, live_old, other_host, other_host_old, legacy_old] + user_files:
        (tmp_path / name).write_bytes(b"x" * 100)
    for name in [live_old, other_host_old, legacy_old] + user_files:
        os.utime(tmp_path / name, (old, old))
    table.save(tmp_path / "t.safetensors")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([other_host, "t.safetensors"] + user_files)


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from xtok_kd.vocab.files import write_atomically

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)

    write_atomically(sys.argv[1], write, replace=False)
""")


def test_a_killed_save_is_cleaned_up_by_the_next_save(table, tmp_path):
    target = tmp_path / "t.safetensors"
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target)], cwd=REPO, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert len(_temps(tmp_path)) == 1 and not target.exists()  # what a killed save leaves
    table.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_saved_table_mode_follows_the_umask(table, tmp_path):
    old = os.umask(0o027)
    try:
        path = table.save(tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------- 1, 12, 13. the CLI checks before working
class _Spy:
    """Stands in for everything expensive; a call means an option was not checked first."""

    def __init__(self, monkeypatch):
        import xtok_kd.cli.align as align
        import xtok_kd.cli.inspect as inspect
        import xtok_kd.vocab as vocab

        self.calls = []
        for module, name in ((align, "open_tokenizer"), (inspect, "open_tokenizer"), (vocab, "get_or_build")):
            monkeypatch.setattr(module, name, self._record(name))
        monkeypatch.setattr(vocab.VocabAlignment, "build", self._record("build"))
        monkeypatch.setattr(vocab.VocabAlignment, "load", self._record("load"))

    def _record(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"{name} ran before the options were checked")

        return call


def _cli(argv, capsys):
    from xtok_kd.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def files(tmp_path):
    """A folder of things an option may wrongly point at."""
    from safetensors.numpy import save_file
    import numpy as np

    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    save_file({"w": np.ones(4, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 my paper")
    (tmp_path / "text.svg").write_text("<svg/> my text", encoding="utf-8")
    (tmp_path / "no_tokenizer").mkdir()
    return tmp_path


ALIGN_CASES = [
    (["-o", "{tmp}/folder"], ["is a folder", "pair.safetensors"]),
    (["-o", "{tmp}/missing/t.safetensors"], ["does not exist", "mkdir -p"]),
    (["-o", "{tmp}/a_file/t.safetensors"], ["not a folder"]),
    (["-o", "{tmp}/model.safetensors"], ["already exists", "--force"]),
    (["-o", "{tmp}/model.safetensors", "--force"], ["not an xtok_kd vocabulary table", "never replaced"]),
    (["-o", "{tmp}/a_file", "--force"], ["should end in .safetensors"]),
    (["-o", ""], ["empty"]),
    (["-o", "{tmp}/t.safetensors", "--neighbours", "-1"], ["--neighbours -1", "from 0 to"]),
    (["-o", "{tmp}/t.safetensors", "--window", "0"], ["--window 0", "from 1 to"]),
    (["-o", "{tmp}/t.safetensors", "--neighbours", "100000"], ["--neighbours 100000"]),
]


@pytest.mark.parametrize("extra, needles", ALIGN_CASES)
def test_align_rejects_bad_options_before_any_work(extra, needles, files, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in files.iterdir()}
    argv = ["align", "gpt2", "mistral"] + [a.format(tmp=files) for a in extra]
    code, out, err = _cli(argv, capsys)
    assert code == 2 and spy.calls == [] and out == ""
    assert err.startswith("xtok-kd align: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in files.iterdir()} == before


def test_align_reports_every_problem_at_once(files, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    code, _, err = _cli(["align", "./no/such/teacher", files / "no_tokenizer", "-o", files / "folder",
                         "--neighbours", "-3", "--window", "0"], capsys)
    assert code == 2 and spy.calls == []
    assert "5 problems" in err
    for needle in ("./no/such/teacher", "has no tokenizer.json", "is a folder", "--neighbours -3", "--window 0"):
        assert needle in err


def test_unwritable_output_folder_is_found_before_any_work(files, monkeypatch, capsys):
    import xtok_kd.vocab.table_file as table_module  # where check_save_target reads probe_writable

    spy = _Spy(monkeypatch)
    locked = files / "folder"
    if os.geteuid() == 0:  # root writes anywhere: fail the probe as a read-only folder would
        def denied(folder):
            raise PermissionError(13, "Permission denied", folder)

        monkeypatch.setattr(table_module, "probe_writable", denied)
    else:
        locked.chmod(0o555)
    try:
        code, _, err = _cli(["align", "gpt2", "mistral", "-o", locked / "t.safetensors"], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2 and spy.calls == []
    assert "Permission denied" in err and "writable folder" in err and str(locked) in err


INSPECT_CASES = [
    (["--plot", "{tmp}/x.jpg"], ["should end in .png, .pdf or .svg"]),
    (["--plot", "{tmp}/x"], ["should end in .png"]),
    (["--plot", ""], ["empty"]),
    (["--plot", "{tmp}/missing/x.png"], ["does not exist", "mkdir -p"]),
    (["--plot", "{tmp}/a_file/x.png"], ["not a folder"]),
    (["--plot", "{tmp}/paper.pdf"], ["not a plot written by xtok-kd", "never replaced"]),
    (["--plot", "{tmp}/text.svg", "--text", "{tmp}/text.svg"], ["is the --text file", "somewhere else"]),
    (["--text", "{tmp}/folder"], ["not a regular file"]),
    (["--text", "{tmp}/latin1.txt"], ["not UTF-8"]),
    (["--text", "{tmp}/empty.txt"], ["is empty"]),
    (["--table", "{tmp}/model.safetensors"], ["not an xtok_kd vocabulary table", "xtok-kd align"]),
    (["--table", "{tmp}/folder"], ["is a folder"]),
    (["--samples", "-1"], ["--samples -1"]),
]


@pytest.mark.parametrize("extra, needles", INSPECT_CASES)
def test_inspect_rejects_bad_options_before_any_work(extra, needles, files, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in files.iterdir()}
    code, out, err = _cli(["inspect", "gpt2", "mistral"] + [a.format(tmp=files) for a in extra], capsys)
    assert code == 2 and spy.calls == [] and out == ""
    assert err.startswith("xtok-kd inspect: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in files.iterdir()} == before


def test_plot_without_matplotlib_fails_before_any_work(files, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if it were not installed
    code, _, err = _cli(["inspect", "qwen2.5", "mistral", "--plot", files / "overlap.png"], capsys)
    assert code == 2 and spy.calls == []
    assert "--plot" in err and "pip install" in err and "matplotlib" in err


def test_broken_tokenizer_file_is_a_clear_error(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    code, _, err = _cli(["align", broken, "gpt2", "-o", tmp_path / "t.safetensors"], capsys)
    assert code == 2 and "Traceback" not in err
    assert str(broken) in err and "could not load" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_align_force_replaces_only_a_table(tmp_path, capsys):
    from xtok_kd.vocab import VocabAlignment

    path = tmp_path / "t.safetensors"
    argv = ["align", "gpt2", "gpt2", "-o", path, "--neighbours", "0", "--no-progress"]
    assert _cli(argv, capsys)[0] == 0
    first = path.read_bytes()
    code, _, err = _cli(argv, capsys)
    assert code == 2 and "already exists" in err and path.read_bytes() == first
    code, out, _ = _cli(argv + ["--window", "3", "--force"], capsys)
    assert code == 0 and "table:" in out
    assert VocabAlignment.load(path).metadata["parameters"]["window"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


@pytest.mark.parametrize("suffix, magic", [("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_plot_formats_and_rerun(table, tmp_path, suffix, magic, capsys):
    saved = table.save(tmp_path / "t.safetensors")
    plot = tmp_path / f"overlap.{suffix}"
    argv = ["inspect", "gpt2", "gpt2", "--table", saved, "--text", "", "--plot", plot]
    for _ in range(2):  # a plot written by xtok-kd is replaced by the next run
        code, out, err = _cli(argv, capsys)
        assert code == 0, err
        assert plot.read_bytes().startswith(magic) and "plot written to" in out
    assert _temps(tmp_path) == []


# ---------------------------------------------------------------------- 15. one build per cache entry
_BUILDER = textwrap.dedent("""
    import json, logging, os, sys, time

    import xtok_kd.vocab.cache  # noqa: F401  (imports done before the start signal)
    from xtok_kd import load_tokenizer
    from xtok_kd.vocab import get_or_build

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("xtok_kd.vocab")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    teacher, student = load_tokenizer("gpt2"), load_tokenizer("mistral")
    folder = sys.argv[1]
    open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.01)
    table = get_or_build(teacher, student, neighbours=1)
    print(json.dumps({
        "built": sum("building vocabulary table" in m for m in messages),
        "loaded": sum("using cached vocabulary table" in m for m in messages),
        "exact": int(table.exact_teacher.shape[0]),
        "messages": messages,
    }))
""")


def test_parallel_processes_build_a_cache_entry_once(tmp_path):
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = dict(os.environ, XTOK_KD_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(sync)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        deadline = time.time() + 120
        while len(list(sync.glob("ready-*"))) < 3:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a builder did not start"
            time.sleep(0.05)
        (sync / "go").touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sum(r["built"] for r in results) == 1, [r["messages"] for r in results]
    assert sum(r["loaded"] for r in results) == 2
    assert len({r["exact"] for r in results}) == 1 and results[0]["exact"] > 1000
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].endswith(".safetensors")  # no temp or lock file left


def test_too_long_file_names_are_found_before_any_work(files, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    code, _, err = _cli(["align", "gpt2", "mistral", "-o", files / ("t" * 300 + ".safetensors")], capsys)
    assert code == 2 and spy.calls == [] and "file name is 312 bytes long" in err
    code, _, err = _cli(["inspect", "gpt2", "mistral", "--plot", files / ("p" * 300 + ".png")], capsys)
    assert code == 2 and spy.calls == [] and "file name is 304 bytes long" in err


def test_long_target_names_get_short_temp_names(table, tmp_path):
    from xtok_kd.vocab import VocabAlignment

    path = table.save(tmp_path / ("表" * 80 + ".safetensors"))  # 252 bytes: the limit, a longer temp would fail
    assert VocabAlignment.load(path).metadata == table.metadata and _temps(tmp_path) == []
