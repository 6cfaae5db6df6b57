"""``xtok_kd.integrations.data``: examples from text, JSON lines and `datasets`; bad rows counted, never a crash."""

from __future__ import annotations

import json
import unicodedata

import pytest

from xtok_kd.assets import SAMPLE_TEXT
from xtok_kd.integrations.data import load_examples, source_problem, split_held_out, split_passages


def _words(text: str) -> list[str]:
    return text.split()


def test_txt_is_cut_into_passages_at_paragraphs(tmp_path):
    examples, skipped = load_examples(SAMPLE_TEXT, chars_per_example=400)
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    assert skipped == {}
    assert len(examples) > 10 and all(set(ex) == {"text"} for ex in examples)
    assert all(len(ex["text"]) <= 400 for ex in examples)
    # nothing lost, nothing reordered; passages start and end at line boundaries of the source, and where they
    # hold several paragraphs, these are whole paragraphs of the source
    assert [w for ex in examples for w in _words(ex["text"])] == _words(text)
    source_lines = set(text.splitlines())
    assert all(line in source_lines for ex in examples for line in ex["text"].split("\n"))
    paragraphs = {p.strip("\n") for p in text.split("\n\n")}
    assert all(inner in paragraphs for ex in examples for inner in ex["text"].split("\n\n")[1:-1])
    assert sum(ex["text"].count("\n\n") for ex in examples) > 10
    # a long paragraph is cut at line boundaries
    long = "\n".join(f"line {i} of one long paragraph" for i in range(100))
    (tmp_path / "long.txt").write_text(long + "\n\nshort one\n", encoding="utf-8")
    pieces, _ = load_examples(tmp_path / "long.txt", chars_per_example=120)
    assert all(len(p["text"]) <= 120 for p in pieces) and pieces[-1]["text"].endswith("short one")
    assert all(line in long.splitlines() or line == "short one" or line == ""
               for p in pieces for line in p["text"].split("\n"))


def test_folder_of_txt_files_and_crlf(tmp_path):
    (tmp_path / "b.txt").write_text("second file\r\n\r\nits second paragraph", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst file", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text data", encoding="utf-8")
    examples, skipped = load_examples(tmp_path, chars_per_example=2000)
    assert [ex["text"] for ex in examples] == ["first file", "second file\n\nits second paragraph", "third"]
    assert skipped == {}


def test_unicode_text_is_never_split_inside_a_character(tmp_path):
    graphemes = ["e\u0301", "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F1EB\U0001F1F7", "\u6f22",
                 "\U0001F44D\U0001F3FD", "\u0915\u094d\u0937", "\u2764\ufe0f", "\u1100\u1161\u11a8"]
    text = "".join(graphemes[i % len(graphemes)] for i in range(400))  # no space, no line break anywhere
    for size in (1, 2, 3, 5, 7, 16):
        passages = split_passages(text, size)
        assert "".join(passages) == text
        for p in passages:
            assert not unicodedata.combining(p[0]) and unicodedata.category(p[0]) not in ("Mn", "Mc", "Me")
            assert p[0] not in "\u200d\ufe0f\u11a8\u1161" and not 0x1F3FB <= ord(p[0]) <= 0x1F3FF
            assert p[-1] != "\u200d"
            p.encode("utf-8")  # valid text: no lone surrogate
        # flags stay whole: every passage holds an even number of regional indicators in a row at its edges
        for p in passages:
            lead = len(p) - len(p.lstrip("".join(chr(c) for c in range(0x1F1E6, 0x1F200))))
            assert lead % 2 == 0
    # the same through a file, with UTF-8 read correctly
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    examples, _ = load_examples(tmp_path / "u.txt", chars_per_example=10)
    assert "".join(ex["text"] for ex in examples) == text


def test_long_line_is_cut_at_spaces():
    line = " ".join(f"word{i}" for i in range(200))
    passages = split_passages(line, 50)
    assert all(len(p) <= 50 for p in passages)
    assert [w for p in passages for w in p.split()] == line.split()


def test_jsonl_with_good_and_bad_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "extra": 1}]
    lines = [
        json.dumps({"text": "a good row"}),
        "{not json",
        json.dumps({"text": "   "}),
        json.dumps({"title": "no text here"}),
        json.dumps({"messages": chat}),
        json.dumps({"messages": [{"role": "user", "content": None}]}),
        json.dumps({"messages": "not a list"}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        "",
        json.dumps([1, 2]),
        json.dumps({"text": 12}),
        '{"text": "caf\\u00e9 \u00e9t\u00e9"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, skipped = load_examples(path)
    assert examples == [{"text": "a good row"}, {"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]},
                        {"messages": [{"role": "user", "content": "only a question"}]},
                        {"text": "café été"}]
    assert skipped == {"bad_json": 1, "no_text_or_messages": 3, "empty_text": 1, "malformed_messages": 2}
    examples, skipped = load_examples(path, loss_on="assistant")
    assert len(examples) == 3 and skipped["no_assistant_turn"] == 1
    assert list(skipped) == ["bad_json", "no_text_or_messages", "empty_text", "malformed_messages",
                             "no_assistant_turn"]


def test_prompt_completion_rows(tmp_path):
    """TRL's prompt-completion rows load as such (the loss is then on the completion); a text field wins; a row
    with an empty completion or half the pair is skipped with a reason."""
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "", "completion": "only an answer"},
            {"prompt": "p", "completion": "  "}, {"prompt": "p"}, {"completion": "c"},
            {"prompt": 3, "completion": "c"}, {"text": "plain", "prompt": "p", "completion": "c"},
            {"prompt": "Ünïcödé ", "completion": "日本語"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    for loss_on in ("all", "assistant"):
        examples, skipped = load_examples(path, loss_on=loss_on)
        assert examples == [{"prompt": "Q: 2+2?\nA:", "completion": " 4"},
                            {"prompt": "", "completion": "only an answer"}, {"text": "plain"},
                            {"prompt": "Ünïcödé ", "completion": "日本語"}]
        assert skipped == {"no_text_or_messages": 3, "empty_text": 1}


def test_json_list_and_custom_fields(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"body": "one"}, {"body": ""}, {"conv": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]}]),
                    encoding="utf-8")
    examples, skipped = load_examples(path, text_field="body", messages_field="conv")
    assert examples[0] == {"text": "one"} and "messages" in examples[1] and skipped == {"empty_text": 1}
    lines = tmp_path / "lines.json"  # JSON lines in a .json file, as `datasets` accepts
    lines.write_text('{"text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    assert load_examples(lines)[0] == [{"text": "x"}, {"text": "y"}]


def test_every_row_bad_is_refused_with_counts_and_format(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('oops\n{"text": ""}\n{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_examples(path)
    message = str(err.value)
    assert "bad_json: 1" in message and "empty_text: 1" in message and "no_text_or_messages: 1" in message
    assert "'text'" in message and "'messages'" in message
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_examples(tmp_path / "empty.txt")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no_assistant_turn: 1.*assistant turn"):
        load_examples(chats, loss_on="assistant")


def test_bad_sources_and_arguments(tmp_path):
    assert "no such file" in source_problem(str(tmp_path / "missing.txt"))
    assert "unknown file type" in source_problem(str(_touch(tmp_path / "data.xlsx")))
    assert source_problem("someone/some_dataset") is None  # a hub name: loading decides
    with pytest.raises(ValueError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_examples(latin)
    with pytest.raises(ValueError, match="loss_on"):
        load_examples(SAMPLE_TEXT, loss_on="user")
    with pytest.raises(ValueError, match="chars_per_example"):
        load_examples(SAMPLE_TEXT, chars_per_example=0)


def _touch(path):
    path.write_text("x", encoding="utf-8")
    return path


def test_datasets_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "row one"}, {"text": ""}, {"text": "row three"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    examples, skipped = load_examples(tmp_path / "d.parquet")
    assert examples == [{"text": "row one"}, {"text": "row three"}] and skipped == {"empty_text": 1}
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_examples(tmp_path / "saved")[0] == examples
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dict"))
    assert load_examples(tmp_path / "dict", split="validation")[0] == examples
    with pytest.raises(ValueError, match="no split 'train'.*validation"):
        load_examples(tmp_path / "dict")


def test_hub_name_offline_says_so_and_suggests_a_local_file(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError) as err:
        load_examples("someone-xtok-kd-test/no_such_dataset")
    message = str(err.value)
    assert "offline" in message and "local .txt, .jsonl or .json file" in message


def test_split_held_out_is_deterministic():
    examples = [{"text": str(i)} for i in range(50)]
    train, held = split_held_out(examples, 0.2, seed=3)
    assert (train, held) == split_held_out(examples, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(train + held, key=lambda e: int(e["text"])) == examples
    assert train == [e for e in examples if e not in held]  # source order kept
    assert split_held_out(examples, 0.2, seed=4)[1] != held
    assert split_held_out(examples, 0.0) == (examples, [])
    assert len(split_held_out(examples[:2], 0.01)[1]) == 1 and len(split_held_out(examples[:3], 0.99)[0]) == 1
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="fraction"):
            split_held_out(examples, bad)
    with pytest.raises(ValueError, match="at least 2"):
        split_held_out(examples[:1], 0.5)
