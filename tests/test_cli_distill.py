"""``xtok-kd distill``: a tiny teacher (Qwen2.5 tokenizer) into a tiny student (Mistral tokenizer), offline, on CPU.

Every run is a few steps of two models with 16-wide layers, so the file runs in well under a minute on two CPUs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from xtok_kd.assets import SAMPLE_TEXT

TRAINER_FLAGS = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
                 "--disable_tqdm", "true", "--save_steps", "2"]
STUDENT = ["--student-config", "tiny", "--student-tokenizer", "mistral", "--student-hidden-size", "16",
           "--student-layers", "1"]


def _main(argv, capsys):
    from xtok_kd.cli.main import main

    code = main(["distill", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_teacher():
    """``(model, tokenizer view)``: a randomly initialised 1-layer Llama over the embedded Qwen2.5 vocabulary."""
    from xtok_kd import load_tokenizer
    from xtok_kd.integrations.models import tiny_llama

    qwen = load_tokenizer("qwen2.5")
    return tiny_llama(qwen.vocab_size, hidden_size=16, layers=1, heads=2, kv_heads=1, seed=1), qwen


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher, tmp_path_factory):
    """The tiny teacher saved with save_pretrained, with the embedded Qwen2.5 tokenizer beside it."""
    folder = tmp_path_factory.mktemp("teacher")
    model, qwen = tiny_teacher
    model.save_pretrained(folder)
    qwen.hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    shutil.copy(SAMPLE_TEXT, path)
    return path


@pytest.fixture(scope="module")
def distilled(teacher_dir, data_file, tmp_path_factory):
    """One full run (live teacher fed to the loss as its top-8, held-out fraction, checkpoints every 2 steps):
    ``(output_dir, argv, stdout)``."""
    from xtok_kd.cli.main import main

    out = tmp_path_factory.mktemp("run") / "student"
    argv = ["--teacher", str(teacher_dir), *STUDENT, "--data", str(data_file), "--chars-per-example", "300",
            "--max-length", "32", "--teacher-top-k", "8", "--eval-fraction", "0.1", "--output-dir", str(out),
            *TRAINER_FLAGS]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["distill", *argv]) == 0
    return out, argv, printed.getvalue()


def test_distill_trains_and_saves_a_loadable_student(distilled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtok_kd import load_tokenizer

    out, _, stdout = distilled
    mistral = load_tokenizer("mistral")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == mistral.vocab_size == 32000
    assert model.get_output_embeddings().weight.shape[0] == mistral.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(mistral.hf) and tokenizer("Hello")["input_ids"] == mistral.hf("Hello")["input_ids"]
    assert "data: 55 examples from" in stdout and "held out 6 of the examples" in stdout
    assert "steps: 3" in stdout and "final (step 3):" in stdout and " ce " in stdout and " kd " in stdout
    assert "eval: loss" in stdout and f"student: {out}" in stdout
    record = json.loads((out / "xtok_kd_distill.json").read_text())
    assert record["status"] == "complete" and record["summary"]["steps"] == 3
    assert record["summary"]["final_kd"] > 0 and record["options"]["mapping"] == "projection"
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


def test_resume_from_checkpoint_continues(distilled, tmp_path, capsys):
    out, argv, _ = distilled
    copy = tmp_path / "student"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-3", ignore_errors=True)
    state_file = copy / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"tag_of_checkpoint_2": 1.0, "step": 2})  # carried on only by a real resume
    state_file.write_text(json.dumps(state))
    resumed = [a if a != str(out) else str(copy) for a in argv]
    at = resumed.index("--max_steps")
    resumed[at + 1] = "4"
    code, stdout, err = _main([*resumed, "--resume_from_checkpoint", "last"], capsys)
    assert code == 0, err
    assert "steps: 4" in stdout
    state = json.loads((copy / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert any("tag_of_checkpoint_2" in e for e in state["log_history"])
    assert [e["step"] for e in state["log_history"] if "ce" in e] == [4]  # the last step is always logged
    assert "AutoModelForCausalLM" in stdout


def test_help_lists_distillation_and_trainer_flags(capsys):
    code, stdout, _ = _main(["--help"], capsys)
    assert code == 0
    for flag in ("--teacher", "--teacher-cache", "--student-config", "--student-tokenizer", "--data",
                 "--eval-fraction", "--mapping", "--divergence", "--kd-weight", "--ce-weight", "--teacher-top-k",
                 "--max-length", "--loss-on", "--teacher-dtype", "--chars-per-example", "--overwrite-output-dir",
                 "--learning_rate", "--max_steps", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                 "--fsdp", "--deepspeed", "--bf16", "--save_steps", "--report_to", "--resume_from_checkpoint",
                 "--output_dir", "--gradient-checkpointing"):
        assert flag in stdout, flag


def test_bad_options_are_all_reported_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, err = _main(["--mapping", "nope", "--divergence", "kl", "--kd-weight", "-1", "--ce-weight", "inf",
                               "--student", "some/student", *STUDENT[:2], "--data", str(tmp_path / "missing.txt"),
                               "--eval-fraction", "1.5", "--max-length", "0", "--loss-on", "everything",
                               "--teacher-dtype", "int8", "--techer", "x", "--loss-block-rows", "0",
                               "--output-dir", str(out)], capsys)
    assert code == 2 and stdout == ""
    assert "Traceback" not in err
    for expected in ("problems with the command line", "unknown option --techer (did you mean --teacher?)",
                     "--mapping 'nope' is not one of projection, uld, hybrid",
                     "--divergence 'kl' is not one of fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl",
                     "--kd-weight -1.0: must be a finite number >= 0", "--ce-weight inf",
                     "--teacher is missing", "exactly one of --student", "--student-config needs --student-tokenizer",
                     "missing.txt'", "--eval-fraction 1.5", "--max-length 0", "--loss-on 'everything'",
                     "--teacher-dtype 'int8'", "--loss-block-rows 0"):
        assert expected in err, expected
    assert "'x'" not in err  # the unknown option's value is not reported as a second problem
    assert not out.exists()
    code, _, err = _main([], capsys)
    assert code == 2 and "--output-dir is missing" in err and "--data is missing" in err
    code, _, err = _main(["--learning_rate", "fast"], capsys)
    assert code == 2 and "--learning_rate" in err and "invalid float value: 'fast'" in err


def test_output_dir_with_user_files_is_refused(teacher_dir, data_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    code, _, err = _main(["--teacher", str(teacher_dir), *STUDENT, "--data", str(data_file), "--output-dir", str(out),
                          "--resume_from_checkpoint", "last", *TRAINER_FLAGS], capsys)
    assert code == 2
    assert "notes.txt" in err and "--overwrite-output-dir" in err and "no checkpoint-N folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = _main(["--teacher", str(teacher_dir / "config.json"), *STUDENT, "--data", str(data_file),
                          "--output-dir", str(out / "notes.txt"), *TRAINER_FLAGS], capsys)
    assert code == 2 and "not a .gguf file" in err and "is a file" in err


def test_prompt_completion_jsonl_trains_on_completions(teacher_dir, tmp_path, capsys):
    """``--data`` rows ``{"prompt", "completion"}`` train with KD, the loss on the completions only."""
    rows = tmp_path / "pc.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what does the fox do?\nAnswer:",
                                          "completion": f" It jumps over the lazy dog, {i} times."})
                               for i in range(6)) + "\n", encoding="utf-8")
    out = tmp_path / "student"
    code, stdout, err = _main(["--teacher", str(teacher_dir), *STUDENT, "--data", str(rows), "--max-length", "48",
                               "--output-dir", str(out), *TRAINER_FLAGS[:-2], "--max_steps", "2",
                               "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert "data: 6 examples" in stdout
    from xtok_kd import load_tokenizer
    from xtok_kd.data import CrossTokenizerCollator

    collator = CrossTokenizerCollator(load_tokenizer(str(teacher_dir)), load_tokenizer("mistral"))
    batch = collator([json.loads(line) for line in rows.read_text().splitlines()[:2]])
    labels, ids = batch["student_labels"], batch["student_input_ids"]
    mistral = load_tokenizer("mistral").hf
    for b in range(2):  # the labelled tokens spell the completion, not the prompt
        kept = ids[b][labels[b] != -100].tolist()
        assert "Answer" not in mistral.decode(kept) and "lazy dog" in mistral.decode(kept)
    record = json.loads((out / "xtok_kd_distill.json").read_text())
    assert record["summary"]["skipped_rows"] == {}
    assert (out / "model.safetensors").is_file()


def test_jsonl_with_bad_rows_reports_skipped_counts(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    good = [json.dumps({"text": f"Example number {i}: the quick brown fox jumps over the lazy dog."}) for i in range(6)]
    chat = json.dumps({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]})
    rows.write_text("\n".join([*good, chat, "{broken", json.dumps({"text": ""}), json.dumps({"id": 3})]) + "\n",
                    encoding="utf-8")
    out = tmp_path / "student"
    code, stdout, err = _main([*STUDENT, "--kd-weight", "0", "--data", str(rows), "--max-length", "32",
                               "--output-dir", str(out), *TRAINER_FLAGS[:-2], "--max_steps", "2",
                               "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert "data: 7 examples" in stdout
    assert "skipped 3 bad rows (bad_json 1, no_text_or_messages 1, empty_text 1)" in stdout
    assert "skipped examples: 3 bad rows at load" in stdout
    record = json.loads((out / "xtok_kd_distill.json").read_text())
    assert record["summary"]["skipped_rows"] == {"bad_json": 1, "no_text_or_messages": 1, "empty_text": 1}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    every_row_bad = tmp_path / "bad.jsonl"
    every_row_bad.write_text("{broken\n" + json.dumps({"text": " "}) + "\n", encoding="utf-8")
    code, _, err = _main([*STUDENT, "--kd-weight", "0", "--data", str(every_row_bad), "--output-dir",
                          str(tmp_path / "other"), *TRAINER_FLAGS], capsys)
    assert code == 2 and "bad_json: 1" in err and "empty_text: 1" in err
    assert not (tmp_path / "other").exists()


def test_student_from_a_folder_with_held_out_data(distilled, tmp_path, capsys):
    """--student: a saved model and its own tokenizer (default); --eval-data; --kd-weight 0 loads no teacher."""
    out, _, _ = distilled
    rows = tmp_path / "eval.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"Held-out line {i}."}) for i in range(3)), encoding="utf-8")
    target = tmp_path / "again"
    code, stdout, err = _main(["--student", str(out), "--teacher", "no/such-teacher", "--kd-weight", "0", "--data",
                               str(SAMPLE_TEXT), "--eval-data", str(rows), "--max-length", "32", "--output-dir",
                               str(target), *TRAINER_FLAGS[:-2], "--max_steps", "1", "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert "the teacher is not loaded" in stdout and "eval data: 3 examples" in stdout and "eval: loss" in stdout
    assert "tokenizer " in stdout and "32,000 ids" in stdout
    # a tokenizer that is not the student's is refused after loading, naming both sizes
    code, _, err = _main(["--student", str(out), "--student-tokenizer", "gpt2", "--kd-weight", "0", "--data",
                          str(SAMPLE_TEXT), "--output-dir", str(tmp_path / "bad"), *TRAINER_FLAGS], capsys)
    assert code == 2 and "32000 output rows" in err and "50257 ids" in err and "not the model's tokenizer" in err
    assert not (tmp_path / "bad").exists()


def test_out_of_memory_names_the_flags_that_help(teacher_dir, data_file, tmp_path, capsys, monkeypatch):
    import torch

    from xtok_kd.integrations import models

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(models, "load_causal_lm", no_memory)
    code, _, err = _main(["--teacher", str(teacher_dir), *STUDENT, "--data", str(data_file), "--output-dir",
                          str(tmp_path / "out"), *TRAINER_FLAGS], capsys)
    assert code == 2 and "Traceback" not in err
    assert "out of memory while loading the teacher" in err
    for flag in ("--teacher-cache", "xtok-kd cache-teacher", "--teacher-dtype bfloat16",
                 "--per-device-train-batch-size", "--max-length", "--gradient-checkpointing", "--loss-block-rows"):
        assert flag in err, flag


def test_teacher_cache_run(tiny_teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from xtok_kd import load_tokenizer
    from xtok_kd.integrations.data import load_examples

    teacher_cache = pytest.importorskip("xtok_kd.teacher_cache")
    model, qwen = tiny_teacher
    examples, _ = load_examples(SAMPLE_TEXT, chars_per_example=300)
    cache = tmp_path / "cache"
    teacher_cache.write_teacher_cache(model, qwen, load_tokenizer("mistral"), examples[:10], cache, top_k=8,
                                      max_length=32, batch_size=5, teacher_name="tiny-qwen", progress=False)
    out = tmp_path / "student"
    code, stdout, err = _main(["--teacher-cache", str(cache), *STUDENT, "--eval-fraction", "0.2", "--output-dir",
                               str(out), *TRAINER_FLAGS[:-2], "--max_steps", "2", "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert "teacher cache:" in stdout and "10 examples, top-8" in stdout and "'tiny-qwen'" in stdout
    assert "final (step 2):" in stdout and " kd " in stdout and "eval: loss" in stdout
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 32000
    # options that contradict the cache are refused before anything is loaded
    code, _, err = _main(["--teacher-cache", str(cache), *STUDENT, "--max-length", "64", "--loss-on", "assistant",
                          "--data", str(SAMPLE_TEXT), "--output-dir", str(tmp_path / "x"), *TRAINER_FLAGS], capsys)
    assert code == 2
    assert "--max-length 64 differs from the teacher cache's 32" in err and "--loss-on 'assistant'" in err
    assert "--data with --teacher-cache" in err and not (tmp_path / "x").exists()
    code, _, err = _main(["--teacher-cache", str(cache), *STUDENT, "--mapping", "hybrid", "--temperature", "2",
                          "--output-dir", str(tmp_path / "x"), *TRAINER_FLAGS], capsys)
    assert code == 2 and "--mapping hybrid needs the teacher's full logits" in err and "--temperature 2" in err
    # a student tokenizer the cache was not made for: the cache's own message, naming both fingerprints
    gpt2 = load_tokenizer("gpt2")
    code, _, err = _main(["--teacher-cache", str(cache), *STUDENT[:2], "--student-tokenizer", "gpt2",
                          "--output-dir", str(tmp_path / "y"), *TRAINER_FLAGS], capsys)
    assert code == 2 and "was made for another tokenizer pair" in err
    assert gpt2.fingerprint in err and load_tokenizer("mistral").fingerprint in err


@pytest.mark.parametrize("mapping", ["alm", "cdm", "sinkhorn"])
def test_new_mappings_train_from_a_teacher_cache(tiny_teacher, tmp_path, capsys, mapping):
    """alm reads the cache's next-token log-probs; cdm and sinkhorn its top-k (with top_k unset they use the
    cache's 8 tokens per position instead of their defaults, 32 and 64)."""
    from xtok_kd import load_tokenizer
    from xtok_kd.integrations.data import load_examples

    teacher_cache = pytest.importorskip("xtok_kd.teacher_cache")
    model, qwen = tiny_teacher
    examples, _ = load_examples(SAMPLE_TEXT, chars_per_example=300)
    cache = tmp_path / "cache"
    teacher_cache.write_teacher_cache(model, qwen, load_tokenizer("mistral"), examples[:6], cache, top_k=8,
                                      max_length=32, batch_size=3, teacher_name="tiny-qwen", progress=False)
    out = tmp_path / "student"
    code, stdout, err = _main(["--teacher-cache", str(cache), *STUDENT, "--mapping", mapping, "--output-dir",
                               str(out), *TRAINER_FLAGS[:-2], "--max_steps", "2", "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert "final (step 2):" in stdout and " kd " in stdout
