"""Teacher-written text (sequence-level KD): :func:`generate_teacher_texts` and the ``--add-teacher-text`` flags of
``xtok-kd cache-teacher`` and ``xtok-kd distill``. Tiny random Llamas (Qwen2.5, GPT-2 and Mistral vocabularies), offline,
on CPU, in seconds."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from xtok_kd.assets import SAMPLE_TEXT
from xtok_kd.integrations import teacher_text
from xtok_kd.integrations.models import tiny_llama
from xtok_kd.integrations.on_policy import split_prompt
from xtok_kd.integrations.teacher_text import generate_teacher_texts
from xtok_kd.tokenizer import char_to_byte_offsets

TINY = {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1}
PARAGRAPHS = [p.strip() for p in SAMPLE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
ROWS = [{"text": p} for p in PARAGRAPHS[:6]]
EMOJI = "Hi 😀🎉 naïve 日本語 ok, 👩‍👩‍👧 and más café ☕ — done 🚀🚀 end"
CHAT = {"messages": [{"role": "user", "content": "Who speaks first?"}, {"role": "assistant", "content": "I do."}]}


@pytest.fixture(scope="module")
def teacher(qwen):
    return tiny_llama(qwen.vocab_size, seed=1, **TINY)


class Spy:
    """Records every ``sample_completions`` call of ``generate_teacher_texts``: prompts, budgets, texts, tokens."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = teacher_text.sample_completions

        def spy(model, view, prompts, budgets, **kw):
            texts, generated = real(model, view, prompts, budgets, **kw)
            self.calls.append((list(prompts), list(budgets), texts, generated))
            return texts, generated

        monkeypatch.setattr(teacher_text, "sample_completions", spy)

    @property
    def prompts(self):
        return [p for call in self.calls for p in call[0]]

    @property
    def budgets(self):
        return [b for call in self.calls for b in call[1]]


def content(view, text, max_length=None):
    """``(spans (n, 2) of the content tokens within max_length, their indices)`` as the collator encodes ``text``."""
    spans = view.encode(text).spans.reshape(-1, 2)
    idx = np.flatnonzero(spans[:, 1] > spans[:, 0])
    if max_length:
        idx = idx[idx < max_length]
    return spans, idx


def prompt_tokens(view, text, prompt, max_length=None):
    """Content tokens of ``text`` (within max_length) that end inside ``prompt``."""
    spans, idx = content(view, text, max_length)
    return int((spans[idx, 1] <= len(prompt.encode("utf-8"))).sum())


# ---------------------------------------------------------------------- generate_teacher_texts
def test_one_row_per_row_in_order_each_starting_with_its_rows_opening(teacher, qwen, monkeypatch):
    spy = Spy(monkeypatch)
    names = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf")  # distinct openings
    texts = [*PARAGRAPHS[:6], PARAGRAPHS[10] + " " + PARAGRAPHS[12]]
    rows = [{"text": f"{name} {text}"} for name, text in zip(names, texts)]
    out = generate_teacher_texts(teacher, qwen, rows, batch_size=3, progress=False)
    assert len(out) == len(rows) and all(set(o) == {"text"} and isinstance(o["text"], str) for o in out)
    assert len(spy.calls) == 3 and [len(c[0]) for c in spy.calls] == [3, 3, 1]
    for row, o, p in zip(rows, out, spy.prompts):
        assert p.text and row["text"].encode("utf-8").startswith(p.text.encode("utf-8"))  # an exact prefix
        assert o["text"].encode("utf-8").startswith(p.text.encode("utf-8")) and o["text"] != p.text
        assert o["text"] != row["text"]  # the teacher's, not the corpus's
    assert all(o["text"].startswith(name) for o, name in zip(out, names))  # in order


@pytest.mark.parametrize("max_length", [None, 12])
def test_the_prompt_share_is_kept(teacher, qwen, monkeypatch, max_length):
    rows = ROWS[:4]
    for share in (0.1, 0.25, 0.5, 0.9):
        spy = Spy(monkeypatch)
        generate_teacher_texts(teacher, qwen, rows, prompt_share=share, max_length=max_length, progress=False)
        for row, p in zip(rows, spy.prompts):
            n = content(qwen, row["text"], max_length)[1].size
            # ASCII text: every Qwen token ends on a character boundary, so the cut is exactly the m-th token
            assert prompt_tokens(qwen, row["text"], p.text, max_length) == max(1, math.floor(share * n)), (share, row)
            assert len(p.ids) == max(1, math.floor(share * n))  # no BOS with Qwen2.5


def test_the_cut_falls_on_a_character_boundary(gpt2, monkeypatch):
    """GPT-2 splits emoji and CJK characters over several byte tokens: the cut moves to the next whole character."""
    model = tiny_llama(gpt2.vocab_size, seed=3, **TINY)
    spans, idx = content(gpt2, EMOJI)
    boundary = set(char_to_byte_offsets(EMOJI).tolist())
    mid = 0
    for share in np.linspace(0.04, 0.96, 24):
        spy = Spy(monkeypatch)
        (out,) = generate_teacher_texts(model, gpt2, [{"text": EMOJI}], prompt_share=float(share), progress=False)
        (p,) = spy.prompts
        m = max(1, math.floor(share * idx.size))
        assert EMOJI.startswith(p.text) and out["text"].startswith(p.text)  # whole characters, byte-exact
        cut = len(p.text.encode("utf-8"))
        assert cut in boundary
        # the first token from the m-th on that ends on a character boundary
        ends = [int(spans[i, 1]) for i in idx[m - 1:]]
        assert cut == next(e for e in ends if e in boundary)
        mid += ends[0] not in boundary
    assert mid >= 3  # the m-th token ended inside a character several times: the rule was exercised


def test_the_teacher_writes_no_more_than_the_rest_of_the_row(teacher, qwen, mistral, monkeypatch):
    rows = [*ROWS[:4], {"text": "Hi"}, {"text": ""}]
    spy = Spy(monkeypatch)
    out = generate_teacher_texts(teacher, qwen, rows, batch_size=1, progress=False)
    assert len(spy.calls) == 4  # nothing is generated for rows with nothing after their prompt
    for row, p, budget, (_, _, _, generated) in zip(rows, spy.prompts, spy.budgets, spy.calls):
        rest = content(qwen, row["text"])[1].size - prompt_tokens(qwen, row["text"], p.text)
        assert budget == rest > 0 and generated <= budget
    assert any(call[3] == call[1][0] for call in spy.calls)  # the budget is the length aimed at (no early EOS)
    assert out[4] == {"text": "Hi"} and out[5] == {"text": ""}
    # max_length counts the teacher's ids as the collator does, BOS included (Mistral adds one)
    writer = tiny_llama(mistral.vocab_size, seed=4, **TINY)
    spy = Spy(monkeypatch)
    rows = [{"text": PARAGRAPHS[i]} for i in (0, 2, 4, 6)]
    out = generate_teacher_texts(writer, mistral, rows, max_length=10, prompt_share=0.3, batch_size=1,
                                 progress=False)
    for row, o, (prompts, budgets, _, generated) in zip(rows, out, spy.calls):
        (p,), (budget,) = prompts, budgets
        assert p.ids[0] == mistral.hf.bos_token_id
        rest = content(mistral, row["text"], 10)[1].size - prompt_tokens(mistral, row["text"], p.text, 10)
        assert budget == min(rest, 10 - len(p.ids)) and len(p.ids) + generated <= 10
        assert o["text"].startswith(p.text)


def test_the_same_seed_gives_the_same_text_another_seed_other_text(teacher, qwen):
    a = generate_teacher_texts(teacher, qwen, ROWS, seed=0, batch_size=4, progress=False)
    assert generate_teacher_texts(teacher, qwen, ROWS, seed=0, batch_size=4, progress=False) == a
    b = generate_teacher_texts(teacher, qwen, ROWS, seed=1, batch_size=4, progress=False)
    assert all(x != y for x, y in zip(a, b))  # a random tiny teacher at temperature 1 samples diverse text


def test_the_callers_random_streams_and_the_teachers_mode_are_kept(teacher, qwen):
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for training in (True, False):
        teacher.train(training)
        generate_teacher_texts(teacher, qwen, ROWS[:2], progress=False)
        assert teacher.training is training
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    teacher.eval()


def test_prompt_completion_rows(teacher, qwen, monkeypatch):
    rows = [{"prompt": "First Citizen:\n", "completion": "Before we proceed any further, hear me speak."},
            {"text": PARAGRAPHS[2]}]
    spy = Spy(monkeypatch)
    out = generate_teacher_texts(teacher, qwen, rows, progress=False)
    assert spy.prompts[0].text == rows[0]["prompt"] and out[0]["text"].startswith(rows[0]["prompt"])
    full = rows[0]["prompt"] + rows[0]["completion"]
    assert spy.budgets[0] == content(qwen, full)[1].size - prompt_tokens(qwen, full, rows[0]["prompt"])
    assert out[0]["text"] != rows[0]["prompt"] and out[1]["text"].startswith(spy.prompts[1].text)


def test_other_rows_and_bad_options_are_refused_naming_them(teacher, qwen, monkeypatch):
    spy = Spy(monkeypatch)
    with pytest.raises(ValueError, match=r"^row 2: teacher text needs .*'messages'.*render chats") as caught:
        generate_teacher_texts(teacher, qwen, [*ROWS[:2], CHAT], progress=False)
    assert "lmbda" not in str(caught.value) and "on-policy" not in str(caught.value)
    for row, words in (({"prompt": "only a prompt"}, "keys ['prompt']"), ("just a str", "a str"),
                       ({"text": 3}, "keys ['text']")):
        with pytest.raises(ValueError, match=r"^row 0: ") as caught:
            generate_teacher_texts(teacher, qwen, [row], progress=False)
        assert words in str(caught.value)
    assert spy.calls == []  # every row is checked before any generation
    bad = [("prompt_share", 0), ("prompt_share", 1.0), ("prompt_share", float("nan")), ("prompt_share", True),
           ("temperature", 0.0), ("temperature", -1), ("temperature", float("inf")), ("temperature", "1"),
           ("max_length", 1), ("max_length", 8.0), ("max_length", True),
           ("batch_size", 0), ("batch_size", 2.5), ("batch_size", False), ("batch_size", None),
           ("seed", -1), ("seed", 1.0)]
    for name, value in bad:
        with pytest.raises(ValueError, match=rf"^{name} must be .*{re.escape(f'got {value!r}')}$"):
            generate_teacher_texts(teacher, qwen, ROWS[:1], **{name: value}, progress=False)
    assert generate_teacher_texts(teacher, qwen, [], progress=False) == []


# ---------------------------------------------------------------------- the command line
TRAINER = ["--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
           "--save_strategy", "no", "--logging_steps", "1", "--max_steps", "2"]
STUDENT = ["--student-config", "tiny", "--student-tokenizer", "mistral", "--student-hidden-size", "16",
           "--student-layers", "1"]


def _main(*argv):
    from xtok_kd.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def teacher_dir(qwen, teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    qwen.hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]), encoding="utf-8")
    return path


def test_cache_teacher_add_teacher_text(teacher_dir, data_file, teacher, qwen, mistral, tmp_path):
    from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

    def command(folder, *extra):
        return ["cache-teacher", "--teacher", teacher_dir, "--student", "mistral", "--data", data_file, "-o", folder,
                "--top-k", 4, "--max-length", 24, "--batch-size", 2, "--shard-size", 3, "--dtype", "float32",
                "--device", "cpu", "--no-progress", *extra]

    out = tmp_path / "cache"
    argv = command(out, "--add-teacher-text")
    code, stdout, err = _main(*argv)
    assert code == 0, err
    assert "teacher text: 4 rows written by the teacher" in stdout
    assert "examples: 8; 4 from --data and 4 written by the teacher" in stdout
    cache = TeacherCache(out)
    rows = [{"text": cache[i]["text"]} for i in range(len(cache))]
    assert len(cache) == 8 and rows[:4] == ROWS[:4]
    # the second half: the teacher's text, written with the cache's max_length and batch size, seed 0, share 0.25
    assert rows[4:] == generate_teacher_texts(teacher, qwen, ROWS[:4], max_length=24, batch_size=2, progress=False)
    for row, written in zip(rows[:4], rows[4:]):
        opening = split_prompt(row, qwen, prompt_share=0.25, max_length=24).text
        assert opening and row["text"].startswith(opening) and written["text"].startswith(opening)
    assert all(cache[i]["teacher_topk_ids"].shape == (min(24, len(qwen.encode(rows[i]["text"]).ids)), 4)
               for i in range(8))
    record = cache.manifest["teacher_text"]
    assert record["rows"] == 4 and record["batch_size"] == 2
    assert (record["prompt_share"], record["temperature"], record["seed"]) == (0.25, 1.0, 0)

    # a rerun with the same settings writes the same text: the finished cache is kept
    code, _, err = _main(*argv)
    assert code == 0, err
    # other teacher-text settings, or none, are refused before the model is loaded; --overwrite replaces
    code, _, err = _main(*argv, "--teacher-text-seed", 1)
    assert code == 2 and "teacher text seed: cache 0, now 1" in err and "--overwrite" in err
    code, _, err = _main(*argv[:-1])
    assert code == 2 and "number of examples: cache 8, now 4" in err and "holds 4 teacher-written rows" in err
    plain = write_teacher_cache(teacher, qwen, mistral, ROWS[:4], tmp_path / "plain", top_k=4, max_length=24,
                                batch_size=2, shard_size=3, progress=False)
    code, _, err = _main(*command(plain, "--add-teacher-text"))
    assert code == 2 and "made without --add-teacher-text" in err
    assert TeacherCache(out).manifest == cache.manifest and len(TeacherCache(plain)) == 4  # neither was touched


def test_cache_teacher_refuses_bad_teacher_text_options(teacher_dir, data_file, tmp_path):
    base = ["cache-teacher", "--teacher", teacher_dir, "--student", "mistral", "-o", tmp_path / "c", "--device",
            "cpu", "--no-progress"]
    code, _, err = _main(*base, "--data", data_file, "--teacher-text-seed", 3, "--teacher-text-temperature", 0.5)
    assert code == 2 and "--teacher-text-seed applies with --add-teacher-text only" in err
    assert "--teacher-text-temperature applies with --add-teacher-text only" in err
    code, _, err = _main(*base, "--data", data_file, "--add-teacher-text", "--teacher-text-prompt-share", 1.5,
                         "--teacher-text-temperature", 0, "--teacher-text-seed", -2, "--max-length", 1)
    assert code == 2
    for words in ("--teacher-text-prompt-share 1.5", "--teacher-text-temperature 0.0", "--teacher-text-seed -2",
                  "--max-length 1 with --add-teacher-text"):
        assert words in err, words
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    code, _, err = _main(*base, "--data", chats, "--add-teacher-text")
    assert code == 2 and "--add-teacher-text: row 1: teacher text needs" in err and "lmbda" not in err
    assert not (tmp_path / "c").exists()


def test_cache_notes_are_recorded_but_never_replace_the_caches_own_entries(teacher, qwen, mistral, tmp_path):
    from xtok_kd.teacher_cache import write_teacher_cache

    for notes, words in (({"k": 3}, "notes may not replace the manifest's own entries ['k']"),
                         ({"examples_sha256": "x", "shards": []}, "['examples_sha256', 'shards']"),
                         ({"teacher_text": {1, 2}}, "notes must be JSON-serialisable")):
        with pytest.raises(ValueError, match=re.escape(words)):
            write_teacher_cache(teacher, qwen, mistral, ROWS[:1], tmp_path / "c", notes=notes, progress=False)
    assert not (tmp_path / "c").exists()


def test_distill_add_teacher_text(teacher_dir, data_file, tmp_path):
    out = tmp_path / "student"
    code, stdout, err = _main("distill", "--teacher", teacher_dir, *STUDENT, "--data", data_file, "--max-length", 24,
                              "--add-teacher-text", "--teacher-text-seed", 2, "--output-dir", out, *TRAINER)
    assert code == 0, err
    assert "teacher text: added 4 rows written by the teacher in" in stdout and "training on 8 rows" in stdout
    assert "final (step 2):" in stdout and " kd " in stdout
    record = json.loads((out / "xtok_kd_distill.json").read_text())
    assert record["summary"]["teacher_text_rows"] == 4 and record["options"]["teacher_text_seed"] == 2
    # --kd-weight 0: pure SeqKD (cross-entropy on the corpus and the teacher's text)
    code, stdout, err = _main("distill", "--teacher", teacher_dir, *STUDENT, "--data", data_file, "--max-length", 24,
                              "--add-teacher-text", "--kd-weight", 0, "--output-dir", tmp_path / "seqkd", *TRAINER)
    assert code == 0, err
    assert "training on 8 rows" in stdout and "the teacher wrote text only" in stdout and "final (step 2):" in stdout


def test_distill_refuses_add_teacher_text_without_a_live_teacher(teacher_dir, data_file, teacher, qwen, mistral,
                                                                  tmp_path):
    from xtok_kd.teacher_cache import write_teacher_cache

    cache = write_teacher_cache(teacher, qwen, mistral, ROWS[:4], tmp_path / "cache", top_k=4, max_length=24,
                                progress=False)
    code, _, err = _main("distill", "--teacher-cache", cache, *STUDENT, "--add-teacher-text", "--output-dir",
                         tmp_path / "x", *TRAINER)
    assert code == 2 and "--add-teacher-text with --teacher-cache" in err
    assert "xtok-kd cache-teacher ... --add-teacher-text" in err and not (tmp_path / "x").exists()
    code, _, err = _main("distill", *STUDENT, "--data", data_file, "--kd-weight", 0, "--add-teacher-text",
                         "--output-dir", tmp_path / "x", *TRAINER)
    assert code == 2 and "--add-teacher-text needs --teacher" in err
    code, _, err = _main("distill", "--teacher", teacher_dir, *STUDENT, "--data", data_file,
                         "--teacher-text-prompt-share", 0.5, "--output-dir", tmp_path / "x", *TRAINER)
    assert code == 2 and "--teacher-text-prompt-share applies with --add-teacher-text only" in err
    code, stdout, _ = _main("distill", "--help")
    assert all(f in stdout for f in ("--add-teacher-text", "--teacher-text-prompt-share", "--teacher-text-seed"))
    assert not (tmp_path / "x").exists()
