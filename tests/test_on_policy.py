"""On-policy distillation (GKD's ``lmbda``) in ``CrossTokenizerKDTrainer`` and ``xtok-kd distill``, and the
collator's ``{"prompt", "completion"}`` rows: tiny random Llamas (a Qwen2.5-vocabulary teacher, a Mistral-vocabulary
student), offline, on CPU, in seconds."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_trainer import GradCapture  # the student's gradient before each optimizer step
from transformers import TrainingArguments

from xtok_kd import CrossTokenizerCollator
from xtok_kd.assets import SAMPLE_TEXT
from xtok_kd.integrations import CrossTokenizerKDTrainer, tiny_llama
from xtok_kd.integrations.on_policy import on_policy_batch, split_prompt
from xtok_kd.integrations.trainer import DistillationCollator

MAX_LENGTH = 48
TEXTS = [p.strip() for p in SAMPLE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
ROWS = [{"text": t} for t in TEXTS[:16]]
TINY = {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1}


@pytest.fixture(scope="module")
def teacher(qwen):
    return tiny_llama(qwen.vocab_size, seed=1, **TINY)


def student(mistral, seed: int = 2):
    return tiny_llama(mistral.vocab_size, seed=seed, **TINY)


def make_args(tmp_path, **kw) -> TrainingArguments:
    options = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "max_steps": 2,
               "logging_steps": 1, "learning_rate": 1e-3, "report_to": [], "use_cpu": True, "save_strategy": "no",
               "train_sampling_strategy": "sequential", "disable_tqdm": True, "seed": 0}
    options.update(kw)
    return TrainingArguments(**options)


class Recorder(CrossTokenizerKDTrainer):
    """Keeps every training batch ``compute_loss`` sees, with its counts."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = [*getattr(self, "seen", []), (inputs, num_items_in_batch)]
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def make_trainer(tmp_path, qwen, mistral, model, teacher_model, *, rows=ROWS, args=None, cls=Recorder, **kw):
    kw.setdefault("max_length", MAX_LENGTH)
    return cls(model, args if args is not None else make_args(tmp_path), teacher_model=teacher_model,
               teacher_tokenizer=qwen, student_tokenizer=mistral, train_dataset=rows, **kw)


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------- (a) what the loss sees
def test_lmbda_one_trains_on_the_students_own_text(tmp_path, qwen, mistral, teacher):
    model = student(mistral)
    before = weights(model)
    trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, lmbda=1.0)
    trainer.train()
    assert len(trainer.seen) == 2 and model.training
    for step, (batch, counts) in enumerate(trainer.seen):
        originals = ROWS[4 * step:4 * step + 4]
        dataset_batch = trainer.data_collator(originals)
        assert batch["on_policy"] == 1 and batch["generated_tokens"] > 0
        assert not torch.equal(batch["student_input_ids"], dataset_batch["student_input_ids"])
        assert bool((batch["student_labels"] == -100).all())  # no CE on the student's own samples
        al = batch["alignment"]
        assert counts.tolist() == [0, int((al.has_rows & al.chunk_loss_mask).sum())] and counts[1] > 0
        for b, (row, original) in enumerate(zip(batch["rows"], originals)):
            prompt = row["prompt"].encode("utf-8")
            assert prompt and original["text"].encode("utf-8").startswith(prompt)  # byte-exact prefix
            # ... cut at the end of one of the student's tokens of the original text
            assert len(prompt) in mistral.encode(original["text"]).spans[:, 1]
            starts = al.chunk_bytes[al.chunk_sample == b, 0]
            mask = al.chunk_loss_mask[al.chunk_sample == b]
            assert np.array_equal(mask, starts >= len(prompt))  # KD on the completion only
            assert (~mask).any()
        assert any(row["completion"] for row in batch["rows"])
    logs = train_logs(trainer)
    assert [e["on_policy"] for e in logs] == [1.0, 1.0]
    assert all(e["generated_tokens"] > 0 and e["kd"] > 0 and "ce" not in e for e in logs)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed_tokens.weight" in changed


def test_generation_leaves_the_training_rng_and_mode_alone(tmp_path, qwen, mistral, teacher):
    model = student(mistral).train()
    trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, lmbda=1.0)
    rows = trainer.data_collator(ROWS[:3])["rows"]
    state = torch.random.get_rng_state()
    first = on_policy_batch(trainer.data_collator, rows, model, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    again = on_policy_batch(trainer.data_collator, rows, model, seed=5)
    other = on_policy_batch(trainer.data_collator, rows, model, seed=6)
    assert first["rows"] == again["rows"] != other["rows"]
    short = on_policy_batch(trainer.data_collator, rows, model, seed=5, max_new_tokens=2)
    assert short["generated_tokens"] <= 2 * len(rows)
    assert [r["prompt"] for r in short["rows"]] == [r["prompt"] for r in first["rows"]]


# ---------------------------------------------------------------------- (b) lmbda=0 changes nothing
def test_lmbda_zero_is_bit_identical_to_the_trainer_without_it(tmp_path, qwen, mistral, teacher):
    finals = []
    for options in ({}, {"lmbda": 0.0, "max_new_tokens": 3, "on_policy_temperature": 0.5, "prompt_share": 0.3}):
        model = student(mistral)
        trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, **options)
        trainer.train()
        assert all("rows" not in batch and "on_policy" not in batch for batch, _ in trainer.seen)
        assert all("on_policy" not in e for e in train_logs(trainer))
        finals.append(weights(model))
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


# ---------------------------------------------------------------------- (c) reproducible mix
def test_same_seed_same_run_and_a_mixed_share(tmp_path, qwen, mistral, teacher):
    runs = []
    for _ in range(2):
        model = student(mistral)
        args = make_args(tmp_path, per_device_train_batch_size=2, max_steps=8)
        trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, args=args, lmbda=0.5, max_new_tokens=6)
        trainer.train()
        runs.append((weights(model), [e["on_policy"] for e in train_logs(trainer)],
                     [b["rows"] for b, _ in trainer.seen]))
    (w0, share0, rows0), (w1, share1, rows1) = runs
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert share0 == share1 and rows0 == rows1 and len(share0) == 8
    assert 0 < sum(share0) / len(share0) < 1
    assert all(s == 1.0 for s, rows in zip(share0, rows0) if "prompt" in rows[0])


# ---------------------------------------------------------------------- (d) gradient accumulation
def test_gradient_accumulation_normalises_over_the_on_policy_batches(tmp_path, qwen, mistral, teacher):
    model = student(mistral)
    grab = GradCapture(model)
    args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                     max_grad_norm=0.0, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")
    trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, args=args, lmbda=1.0, callbacks=[grab])
    trainer.train()
    (first, counts), (second, counts2) = trainer.seen
    assert first["on_policy"] == second["on_policy"] == 1
    chunks = [int((b["alignment"].has_rows & b["alignment"].chunk_loss_mask).sum()) for b in (first, second)]
    assert counts.tolist() == counts2.tolist() == [0, sum(chunks)] and chunks[0] != chunks[1]
    # The gradient of the four on-policy rows as ONE batch (means over its chunks), from the initial weights.
    fresh = student(mistral)
    whole = trainer.data_collator(first["rows"] + second["rows"])
    whole["student_labels"] = torch.full_like(whole["student_labels"], -100)
    trainer.compute_loss(fresh, whole).backward()
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(grab.grads[0][name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------- (e) refusals
@pytest.mark.parametrize("options, match", [
    ({"lmbda": -0.1}, r"lmbda.*-0\.1"),
    ({"lmbda": 1.5}, r"lmbda.*1\.5"),
    ({"lmbda": "x"}, "lmbda.*'x'"),
    ({"lmbda": float("nan")}, "lmbda.*nan"),
    ({"lmbda": True}, "lmbda.*True"),
    ({"lmbda": 0.5, "on_policy_temperature": 0}, "on_policy_temperature.*got 0"),
    ({"lmbda": 0.5, "prompt_share": 0}, "prompt_share.*got 0"),
    ({"lmbda": 0.5, "prompt_share": 1}, "prompt_share.*got 1"),
    ({"lmbda": 0.5, "max_new_tokens": 0}, "max_new_tokens.*got 0"),
    ({"lmbda": 0.5, "kd_weight": 0.0}, "kd_weight=0.0"),
])
def test_bad_on_policy_options_raise_naming_the_value(tmp_path, qwen, mistral, teacher, options, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, **options)


def test_on_policy_refuses_what_it_cannot_prompt(tmp_path, qwen, mistral, teacher):
    with pytest.raises(ValueError, match=r"lmbda=0\.5.*teacher_model="):
        make_trainer(tmp_path, qwen, mistral, student(mistral), None, lmbda=0.5)
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    with pytest.raises(ValueError, match=r"messages.*prompt/completion"):
        make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, rows=chats * 4, lmbda=0.5)
    with pytest.raises(ValueError, match=r"\{'messages': \[\.\.\.\]\} row.*lmbda=0"):
        split_prompt(chats[0], mistral)
    with pytest.raises(TypeError, match="DistillationCollator.*got data_collator=CrossTokenizerCollator"):
        make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, lmbda=0.5,
                     data_collator=CrossTokenizerCollator(qwen, mistral))


# ---------------------------------------------------------------------- prompts
def test_text_prompt_is_cut_at_a_character_boundary(mistral):
    text = "Birds: " + "\U0001F99C" * 6 + " and \u00e9t\u00e9 \u65e5\u672c\u8a9e ok."  # byte-fallback pieces
    enc = mistral.encode(text)
    content = np.flatnonzero(enc.spans[:, 1] > enc.spans[:, 0])
    assert any(len(text.encode("utf-8")[:e].decode("utf-8", errors="ignore").encode()) != e
               for e in enc.spans[content, 1])  # some student tokens do end inside a character
    for share in (0.05, 0.2, 0.3, 0.45, 0.6, 0.8, 0.95):
        p = split_prompt({"text": text}, mistral, prompt_share=share)
        end = len(p.text.encode("utf-8"))
        assert text.startswith(p.text) and p.text
        assert p.ids == enc.ids[:len(p.ids)].tolist() and enc.spans[len(p.ids) - 1, 1] == end
        held = int((enc.spans[content, 1] <= end).sum())
        assert held >= max(1, math.floor(share * content.size))
        assert p.completion_tokens == max(content.size - held, 1)
    # max_length: only the tokens the collator keeps count
    short = split_prompt({"text": text}, mistral, prompt_share=0.5, max_length=9)
    assert len(short.ids) <= 9 and short.completion_tokens <= 8
    pc = split_prompt({"prompt": "Hello there", "completion": " general Kenobi"}, mistral)
    assert pc.text == "Hello there" and pc.ids == mistral.encode("Hello there").ids.tolist()
    assert pc.completion_tokens == sum(1 for a, b in mistral.encode("Hello there general Kenobi").spans
                                       if b > a >= len("Hello there"))
    assert split_prompt({"text": ""}, mistral) == ("", [], 1)


# ---------------------------------------------------------------------- (f) prompt/completion rows
@pytest.mark.parametrize("prompt, completion", [
    ("Gr\u00fc\u00dfe aus K\u00f6", "ln \u2014 \u00fcber\u00e4ll!"),
    ("\u65e5\u672c", "\u8a9e\u306e\u6587\u7ae0\u3067\u3059\u3002 Fine."),
    ("Parrots \U0001F99C", "\U0001F99C fly."),
])
def test_collator_prompt_completion_rows(qwen, mistral, prompt, completion):
    collator = CrossTokenizerCollator(qwen, mistral)
    text, cut = prompt + completion, len(prompt.encode("utf-8"))
    batch = collator([{"prompt": prompt, "completion": completion}])
    plain = collator([{"text": text}])
    assert torch.equal(batch["student_input_ids"], plain["student_input_ids"])
    assert torch.equal(batch["teacher_input_ids"], plain["teacher_input_ids"])
    al = batch["alignment"]
    total = len(text.encode("utf-8"))
    assert int(al.covered_bytes[0]) == total and al.aligned_share == plain["alignment"].aligned_share
    assert al.chunk_bytes[0, 0] == 0 and al.chunk_bytes[-1, 1] == total  # the alignment spans the whole text
    assert np.array_equal(al.chunk_loss_mask, al.chunk_bytes[:, 0] >= cut)  # KD chunks: the completion only
    assert al.chunk_loss_mask.any() and (~al.chunk_loss_mask).any()
    spans = mistral.encode(text).spans
    ids = batch["student_input_ids"][0].numpy()
    expected = np.where((spans[:, 1] > spans[:, 0]) & (spans[:, 0] >= cut), ids, -100)
    assert np.array_equal(batch["student_labels"][0].numpy(), expected)  # labels: the completion only
    assert (expected != -100).any()


def test_collator_refuses_half_a_prompt_completion_row(qwen, mistral):
    collator = CrossTokenizerCollator(qwen, mistral)
    for bad in ({"prompt": "x"}, {"completion": "x"}, {"text": "a", "prompt": "b", "completion": "c"}):
        with pytest.raises(ValueError, match="exactly one of 'text' or 'messages', or both 'prompt' and 'completion'"):
            collator([bad])
    with pytest.raises(ValueError, match="'prompt' must be a str, got int"):
        collator([{"prompt": 3, "completion": "x"}])


def test_teacher_cache_of_prompt_completion_rows(tmp_path, qwen, mistral, teacher):
    from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

    rows = [{"prompt": TEXTS[i][:20], "completion": TEXTS[i][20:]} for i in range(4)]
    path = write_teacher_cache(teacher, qwen, mistral, rows, tmp_path / "cache", top_k=4, max_length=MAX_LENGTH,
                               batch_size=2, progress=False)
    cache = TeacherCache(path)
    assert {k: cache[1][k] for k in ("prompt", "completion")} == rows[1]
    batch = DistillationCollator(CrossTokenizerCollator(qwen, mistral, max_length=MAX_LENGTH))(
        [cache[i] for i in range(4)])
    assert batch["teacher_topk_ids"].shape[-1] == 4
    al = batch["alignment"]
    assert np.array_equal(al.chunk_loss_mask, al.chunk_bytes[:, 0] >= 20)  # ASCII: 20 characters, 20 bytes


# ---------------------------------------------------------------------- the cache + a live teacher
def test_cache_batches_off_policy_and_live_teacher_on_policy(tmp_path, qwen, mistral, teacher):
    from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

    path = write_teacher_cache(teacher, qwen, mistral, ROWS[:8], tmp_path / "cache", top_k=8, max_length=MAX_LENGTH,
                               batch_size=4, progress=False)
    calls = []
    hook = teacher.register_forward_hook(lambda m, i, o: calls.append(i))
    try:
        trainer = Recorder(student(mistral), make_args(tmp_path, per_device_train_batch_size=2, max_steps=3,
                                                      seed=42),
                           teacher_model=teacher, student_tokenizer=mistral, train_dataset=TeacherCache(path),
                           teacher_top_k=8, lmbda=0.5)
        trainer.train()
    finally:
        hook.remove()
    kinds = [batch["on_policy"] for batch, _ in trainer.seen]
    assert 0 in kinds and 1 in kinds  # seed 42: on, on, off
    for batch, _ in trainer.seen:
        assert ("teacher_topk_ids" in batch) == (batch["on_policy"] == 0)
        assert all(set(row) == {"text"} for row in batch["rows"]) == (batch["on_policy"] == 0)
    assert len(calls) == kinds.count(1)  # the live teacher ran for the on-policy batches only
    assert all(math.isfinite(e["kd"]) and e["kd"] > 0 for e in train_logs(trainer))


# ---------------------------------------------------------------------- (g) the command line
CLI_TRAINER = ["--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
               "--save_strategy", "no", "--logging_steps", "1", "--max_steps", "2"]
CLI_STUDENT = ["--student-config", "tiny", "--student-tokenizer", "mistral", "--student-hidden-size", "16",
               "--student-layers", "1"]


def _main(argv):
    from xtok_kd.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["distill", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def teacher_dir(qwen, teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    qwen.hf.save_pretrained(folder)
    return folder


def test_cli_distill_with_lmbda(tmp_path, teacher_dir, teacher, qwen, mistral):
    from transformers import AutoModelForCausalLM

    from xtok_kd.integrations.data import load_examples
    from xtok_kd.teacher_cache import write_teacher_cache

    out = tmp_path / "student"
    code, stdout, err = _main(["--teacher", str(teacher_dir), *CLI_STUDENT, "--data", str(SAMPLE_TEXT),
                               "--chars-per-example", "300", "--max-length", "32", "--lmbda", "0.5",
                               "--max-new-tokens", "8", "--on-policy-temperature", "0.9", "--prompt-share", "0.4",
                               "--output-dir", str(out), *CLI_TRAINER])
    assert code == 0, err
    assert "'on_policy'" in stdout and "'generated_tokens'" in stdout and "final (step 2):" in stdout
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == mistral.vocab_size

    examples, _ = load_examples(SAMPLE_TEXT, chars_per_example=300)
    cache = write_teacher_cache(teacher, qwen, mistral, examples[:6], tmp_path / "cache", top_k=8, max_length=32,
                                batch_size=3, progress=False)
    code, _, err = _main(["--teacher-cache", str(cache), *CLI_STUDENT, "--lmbda", "0.5", "--output-dir",
                          str(tmp_path / "x"), *CLI_TRAINER])
    assert code == 2 and "--lmbda 0.5 with --teacher-cache needs --teacher too" in err
    assert not (tmp_path / "x").exists()
    # the cache for the other batches and the live teacher for the on-policy ones
    code, stdout, err = _main(["--teacher-cache", str(cache), "--teacher", str(teacher_dir), *CLI_STUDENT,
                               "--lmbda", "1", "--output-dir", str(tmp_path / "both"), *CLI_TRAINER])
    assert code == 0, err
    assert "for the on-policy batches" in stdout and "'on_policy': '1'" in stdout
    code, _, err = _main(["--teacher", str(teacher_dir), *CLI_STUDENT, "--data", str(SAMPLE_TEXT), "--lmbda", "1.5",
                          "--prompt-share", "1", "--on-policy-temperature", "0", "--max-new-tokens", "0",
                          "--output-dir", str(tmp_path / "y"), *CLI_TRAINER])
    assert code == 2
    for expected in ("--lmbda 1.5", "--prompt-share 1.0", "--on-policy-temperature 0.0", "--max-new-tokens"):
        assert expected in err, expected
    code, stdout, _ = _main(["--help"])
    assert all(flag in stdout for flag in ("--lmbda", "--max-new-tokens", "--on-policy-temperature",
                                           "--prompt-share"))
