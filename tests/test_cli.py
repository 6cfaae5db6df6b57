"""``xtok-kd align`` and ``xtok-kd inspect``: outputs, JSON, plot, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from conftest import tokenizer_path


def _run(argv, capsys):
    from xtok_kd.cli.main import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved_table(tmp_path_factory):
    from xtok_kd.cli.main import main

    path = tmp_path_factory.mktemp("cli") / "gpt2-mistral.safetensors"
    assert main(["align", tokenizer_path("gpt2"), tokenizer_path("mistral"), "-o", str(path),
                 "--neighbours", "2", "--no-progress"]) == 0
    return path


def test_align_writes_a_loadable_table(saved_table, capsys):
    from xtok_kd.vocab import VocabAlignment

    table = VocabAlignment.load(saved_table, tokenizer_path("gpt2"), tokenizer_path("mistral"))
    assert table.metadata["command"].startswith("xtok-kd align ")
    assert table.metadata["parameters"]["neighbours"] == 2


def test_align_prints_summary(tmp_path, capsys):
    code, out, err = _run(["align", tokenizer_path("gpt2"), tokenizer_path("mistral"), "-o",
                           str(tmp_path / "t.safetensors"), "--neighbours", "1"], capsys)
    assert code == 0
    assert "exact pairs:" in out and "teacher->student: mapped 100.0%" in out and "MB" in out
    assert "align vocabularies" in err  # the tqdm bar


def test_inspect_with_table_text_json_and_plot(saved_table, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Hello world.\n\n    def f(x):\n        return 12345\n\n你好，世界", encoding="utf-8")
    png = tmp_path / "out.png"
    code, out, _ = _run(["inspect", tokenizer_path("gpt2"), tokenizer_path("mistral"), "--table",
                         str(saved_table), "--text", str(text), "--json", "--plot", str(png)], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["teacher"]["vocab_size"] == 50257 and report["student"]["vocab_size"] == 32000
    assert 0 < report["exact"]["student_share"] <= 1
    assert set(report["categories"]) == {"multi-digit numbers", "whitespace runs", "code indentation",
                                         "punctuation", "CJK"}
    tx = report["text"]
    assert tx["bytes"] == len(text.read_bytes()) and tx["teacher_tokens_per_1000_bytes"] > 0
    assert 0 < tx["one_to_one_share"] <= 1 and tx["mean_teacher_tokens_per_chunk"] >= 1
    assert report["unmatched"]["teacher"]["samples"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_text_report(saved_table, capsys):
    code, out, _ = _run(["inspect", tokenizer_path("gpt2"), tokenizer_path("mistral"), "--table",
                         str(saved_table), "--samples", "3"], capsys)
    assert code == 0
    assert "exact overlap:" in out and "coverage by category" in out and "without an exact match" in out


def test_inspect_builds_into_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    code, out, _ = _run(["inspect", tokenizer_path("gpt2"), tokenizer_path("gpt2"), "--json"], capsys)
    assert code == 0 and json.loads(out)["exact"]["teacher_share"] == 1.0
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["align", "./no/such/tokenizer", "{gpt2}", "-o", "{tmp}/t.safetensors"], "./no/such/tokenizer"),
        (["align", "{gpt2}", "{tmp}", "-o", "{tmp}/t.safetensors"], "has no tokenizer.json"),
        (["align", "{gpt2}", "{gpt2}", "-o", "{tmp}/t.bin"], "should end in .safetensors"),
        (["inspect", "{gpt2}", "{gpt2}", "--table", "{tmp}/missing.safetensors"], "xtok-kd align"),
        (["inspect", "{gpt2}", "{gpt2}", "--text", "{tmp}/missing.txt"], "no such file"),
        (["inspect", "{gpt2}", "{gpt2}", "--plot", "{tmp}/x.jpg"], "should end in .png"),
        (["align", "{gpt2}", "{gpt2}", "-o", "{tmp}"], "is a folder"),
        (["align", "{gpt2}", "{gpt2}", "-o", "{tmp}/no/such/folder/t.safetensors"], "does not exist"),
        (["align", "{gpt2}", "{gpt2}/tokenizer_config.json", "-o", "{tmp}/t.safetensors"], "is a file"),
        (["inspect", "{gpt2}", "{gpt2}", "--plot", "{tmp}/no/such/folder/x.png"], "does not exist"),
        (["inspect", "{gpt2}", "{gpt2}", "--text", "{tmp}"], "not a regular file"),
    ],
)
def test_bad_input_gives_a_clear_error(argv, needle, tmp_path, capsys):
    argv = [a.format(gpt2=tokenizer_path("gpt2"), tmp=tmp_path) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert err.startswith(f"xtok-kd {argv[0]}: error:")


def test_align_refuses_an_existing_output_without_force(saved_table, capsys):
    before = saved_table.read_bytes()
    code, _, err = _run(["align", tokenizer_path("gpt2"), tokenizer_path("mistral"), "-o", str(saved_table)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err and "Traceback" not in err
    assert saved_table.read_bytes() == before


def test_table_for_other_tokenizers_is_refused(saved_table, capsys):
    code, _, err = _run(["inspect", tokenizer_path("gpt2"), tokenizer_path("qwen2.5"), "--table",
                         str(saved_table)], capsys)
    assert code == 2 and "fingerprint" in err


def test_unknown_subcommand_exits():
    from xtok_kd.cli.main import main

    with pytest.raises(SystemExit) as err:
        main(["nope"])
    assert err.value.code == 2
