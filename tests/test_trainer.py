"""``CrossTokenizerKDTrainer`` end to end on tiny random Llamas: a Qwen2.5-vocabulary teacher, a Mistral-vocabulary
student (the tokenizers ship inside the package), texts from ``xtok_kd/assets/sample.txt``. Offline, CPU, seconds."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback, TrainingArguments

from xtok_kd.assets import SAMPLE_TEXT
from xtok_kd.integrations import CrossTokenizerKDTrainer, tiny_llama

MAX_LENGTH = 48
#: Paragraphs of very different lengths, so that per-micro-batch means differ from means over the whole batch.
TEXTS = [p.strip() for p in SAMPLE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
ROWS = [{"text": t} for t in TEXTS[:24]]
CHATS = [
    {"messages": [{"role": "user", "content": TEXTS[i]}, {"role": "assistant", "content": TEXTS[i + 1]}]}
    for i in range(0, 16, 2)
]


@pytest.fixture(scope="module")
def teacher(qwen):
    return tiny_llama(qwen.vocab_size, seed=1)


def student(mistral, seed: int = 2):
    return tiny_llama(mistral.vocab_size, seed=seed)


def make_args(tmp_path, **kw) -> TrainingArguments:
    options = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
               "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "report_to": [], "use_cpu": True,
               "save_strategy": "no", "train_sampling_strategy": "sequential", "disable_tqdm": True, "seed": 0}
    options.update(kw)
    return TrainingArguments(**options)


def make_trainer(tmp_path, qwen, mistral, model, teacher_model=None, *, rows=ROWS, args=None, **kw):
    kw.setdefault("max_length", MAX_LENGTH)
    return CrossTokenizerKDTrainer(model, args if args is not None else make_args(tmp_path), teacher_model=teacher_model,
                                   teacher_tokenizer=qwen, student_tokenizer=mistral, train_dataset=rows, **kw)


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


class GradCapture(TrainerCallback):
    """The student's accumulated gradient just before each optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})


# ---------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path, qwen, mistral, teacher):
    rows = [ROWS[i] for i in (0, 5, 2, 9)]  # 1 line / several lines: micro-batches with unequal counts
    runs = []
    for batch, steps in ((4, 1), (2, 2)):
        model = student(mistral)
        grab = GradCapture(model)
        args = make_args(tmp_path / f"b{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                         max_steps=1, max_grad_norm=0.0, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")
        trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, rows=rows, args=args, callbacks=[grab])
        trainer.train()
        runs.append((grab.grads[0], dict(model.named_parameters()), train_logs(trainer)[0]))
    (g_big, w_big, log_big), (g_acc, w_acc, log_acc) = runs
    assert g_big.keys() == g_acc.keys() and len(g_big) > 0
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(w_acc[name], w_big[name], atol=1e-5, rtol=1e-4, msg=name)
    assert log_acc["loss"] == pytest.approx(log_big["loss"], rel=1e-5)

    # The micro-batches' own means would give another gradient: the check above can fail.
    model = student(mistral)
    trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, rows=rows)
    halves = [trainer.data_collator(rows[:2]), trainer.data_collator(rows[2:])]
    for half in halves:
        (trainer.compute_loss(model, half) / 2).backward()
    name = "model.embed_tokens.weight"
    assert not torch.allclose(model.get_parameter(name).grad, g_big[name], atol=1e-5, rtol=1e-3)


def test_counts_cover_the_accumulated_batch(tmp_path, qwen, mistral, teacher):
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher)
    batches = [trainer.data_collator(ROWS[:2]), trainer.data_collator(ROWS[2:5])]
    counts = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    tokens = sum(int((b["student_labels"][:, 1:] != -100).sum()) for b in batches)
    chunks = sum(int((b["alignment"].has_rows & b["alignment"].chunk_loss_mask).sum()) for b in batches)
    assert counts.tolist() == [tokens, chunks] and tokens > 0 and chunks > 0


# ---------------------------------------------------------------------- the teacher
def test_teacher_is_frozen_in_eval_mode_and_the_student_learns(tmp_path, qwen, mistral, teacher):
    model = student(mistral)
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    hook = teacher.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    try:
        trainer = make_trainer(tmp_path, qwen, mistral, model, teacher)
        assert not teacher.training
        teacher.train()  # e.g. a callback: the trainer must put it back into eval mode before its forward
        trainer.train()
    finally:
        hook.remove()
    assert seen == [(False, False)] * 2  # one forward per step, in eval mode, without autograd
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert p.grad is None and not p.requires_grad, name
        assert torch.equal(p, t_before[name]), name
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, s_before[n])]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(s_before)


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_the_student_only_and_resume_continues(tmp_path, qwen, mistral, teacher):
    from safetensors.torch import load_file

    from xtok_kd.tokenizer import load_tokenizer

    model = student(mistral)
    args = make_args(tmp_path / "a", max_steps=3, save_strategy="steps", save_steps=2)
    make_trainer(tmp_path, qwen, mistral, model, teacher, args=args).train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["vocab_size"] == mistral.vocab_size != qwen.vocab_size
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters())
    assert not any(qwen.vocab_size in t.shape for t in tensors.values())
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
    assert load_tokenizer(str(ckpt)).fingerprint == mistral.fingerprint

    # Resume a fresh trainer (other initial weights) from checkpoint-2 alone: step 3 gives the uninterrupted weights.
    resumed_dir = tmp_path / "b" / "out"
    shutil.copytree(ckpt, resumed_dir / "checkpoint-2")
    other = student(mistral, seed=7)
    trainer = make_trainer(tmp_path, qwen, mistral, other, teacher, args=make_args(tmp_path / "b", max_steps=3))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    assert [e["step"] for e in train_logs(trainer)] == [1, 2, 3]  # 1, 2 from the checkpoint's state
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------- metrics
@pytest.mark.parametrize("mapping", ["projection", "uld"])
def test_logged_metrics_and_loss_decomposition(tmp_path, qwen, mistral, teacher, mapping):
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, ce_weight=0.5, kd_weight=2.0,
                           loss_options={"mapping": mapping})
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 2
    specific = {"projection": "teacher_mass_mapped", "uld": "uld_bound"}
    for log in logs:
        for key in ("ce", "kd", "aligned_share", "dropped_chunks", "chunks", "skipped_examples", specific[mapping]):
            assert key in log, (key, log)
        other = specific["uld" if mapping == "projection" else "projection"]
        assert other not in log
        assert log["loss"] == pytest.approx(0.5 * log["ce"] + 2.0 * log["kd"], rel=1e-5)
        assert 0.5 < log["aligned_share"] <= 1.0 and log["chunks"] > 0 and log["kd"] > 0
        assert log["skipped_examples"] == 0
    if mapping == "projection":
        assert all(0 < log["teacher_mass_mapped"] <= 1 + 1e-6 for log in logs)


def test_evaluate_returns_and_logs_kd_metrics_apart_from_training(tmp_path, qwen, mistral, teacher):
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, rows=ROWS[:8], eval_dataset=ROWS[8:12],
                           ce_weight=1.0, kd_weight=3.0, args=args)
    trainer.train()

    def chunks(rows):
        a = trainer.data_collator(rows)["alignment"]
        return int((a.has_rows & a.chunk_loss_mask).sum())

    logs, evals = train_logs(trainer), [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(logs) == len(evals) == 2
    # Each record holds its own batches only: training steps 1 and 2, and the two evaluation batches.
    assert [e["chunks"] for e in logs] == [chunks(ROWS[:4]), chunks(ROWS[4:8])]
    assert all(e["eval_chunks"] == (chunks(ROWS[8:10]) + chunks(ROWS[10:12])) / 2 for e in evals)
    assert not any(k.startswith("eval_") for e in logs for k in e)

    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_ce", "eval_kd", "eval_aligned_share", "eval_chunks", "eval_teacher_mass_mapped"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # Two batches of 2: eval_loss is the mean of the batches' losses, the metrics the means of their terms.
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce"] + 3.0 * metrics["eval_kd"], rel=1e-5)
    assert trainer.state.log_history[-1]["eval_kd"] == metrics["eval_kd"]
    assert trainer.predict(ROWS[8:12]).metrics["test_kd"] == pytest.approx(metrics["eval_kd"], rel=1e-6)


# ---------------------------------------------------------------------- weights and the teacher's absence
def test_kd_weight_zero_trains_without_a_teacher(tmp_path, qwen, mistral):
    model = student(mistral)
    before = model.model.embed_tokens.weight.detach().clone()
    args = make_args(tmp_path, include_num_input_tokens_seen="non_padding")
    trainer = make_trainer(tmp_path, qwen, mistral, model, None, kd_weight=0.0, args=args)
    trainer.train()
    logs = train_logs(trainer)
    assert all("kd" not in e and e["loss"] == pytest.approx(e["ce"], rel=1e-5) for e in logs)
    assert not torch.equal(before, model.model.embed_tokens.weight)
    # The Trainer's token and FLOP counts read the student's inputs.
    tokens = sum(int(trainer.data_collator(ROWS[a:a + 4])["student_attention_mask"].sum()) for a in (0, 4))
    assert trainer.state.num_input_tokens_seen == tokens
    assert trainer.state.total_flos > 0


@pytest.mark.parametrize("options, match", [
    ({"kd_weight": 1.0}, "teacher_model"),
    ({"kd_weight": -1.0}, "kd_weight.*-1.0"),
    ({"kd_weight": float("nan")}, "kd_weight.*nan"),
    ({"ce_weight": "1"}, "ce_weight.*'1'"),
    ({"ce_weight": True}, "ce_weight.*True"),
    ({"kd_weight": 0.0, "ce_weight": 0.0}, "both 0"),
    ({"kd_weight": 0.0, "teacher_top_k": 0}, "teacher_top_k.*0"),
])
def test_bad_arguments_raise_naming_the_value(tmp_path, qwen, mistral, options, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, qwen, mistral, student(mistral), None, **options)


def test_kd_without_teacher_refuses_an_uncached_eval_set(tmp_path, qwen, mistral):
    with pytest.raises(ValueError, match="eval_dataset"):
        CrossTokenizerKDTrainer(student(mistral), make_args(tmp_path), teacher_tokenizer=qwen,
                                student_tokenizer=mistral, eval_dataset=ROWS[:4])


# ---------------------------------------------------------------------- data
def test_bad_rows_are_skipped_counted_and_an_all_bad_batch_raises(tmp_path, qwen, mistral, teacher):
    rows = [ROWS[0], {"prompt": "no text key"}, ROWS[1], ROWS[2], ROWS[3], ROWS[4], {"text": 5}, ROWS[5]]
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, rows=rows)
    with pytest.warns(UserWarning, match="skipped 1 invalid example"):
        trainer.train()
    logs = train_logs(trainer)
    assert [e["skipped_examples"] for e in logs] == [1, 1]
    assert all(math.isfinite(e["loss"]) and e["chunks"] > 0 for e in logs)
    with pytest.raises(ValueError, match=r"every example.*row 0.*row 1"):
        trainer.data_collator([{"prompt": "x"}, {"text": None}])


def test_chat_rows_train_on_assistant_content(tmp_path, qwen, mistral, teacher):
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, rows=CHATS, loss_on="assistant",
                           max_length=96)
    batch = trainer.data_collator(CHATS[:4])
    everything = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, rows=CHATS, loss_on="all",
                              max_length=96).data_collator(CHATS[:4])
    labelled = int((batch["student_labels"] != -100).sum())
    assert 0 < labelled < int((everything["student_labels"] != -100).sum())
    assert 0 < int(batch["alignment"].chunk_loss_mask.sum()) < batch["alignment"].num_chunks
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and e["kd"] > 0 and e["chunks"] > 0 for e in logs)


def test_live_top_k_trains_and_differs_from_full_logits(tmp_path, qwen, mistral, teacher):
    model = student(mistral).eval()
    losses = {}
    for k in (None, 8):
        trainer = make_trainer(tmp_path, qwen, mistral, model, teacher, teacher_top_k=k)
        with torch.no_grad():
            losses[k] = float(trainer.compute_loss(model, trainer.data_collator(ROWS[:4])))
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses[8] - losses[None]) > 1e-4
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, teacher_top_k=8,
                           args=make_args(tmp_path, max_steps=1))
    trainer.train()
    assert math.isfinite(train_logs(trainer)[0]["kd"])
    with pytest.raises(ValueError, match="hybrid"):
        make_trainer(tmp_path, qwen, mistral, model, teacher, teacher_top_k=8, loss_options={"mapping": "hybrid"})


def test_teacher_cache_gives_the_live_top_k_loss(tmp_path, qwen, mistral, teacher):
    from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

    k, rows = 8, ROWS[:8]
    path = write_teacher_cache(teacher, qwen, mistral, rows, tmp_path / "cache", top_k=k, max_length=MAX_LENGTH,
                               batch_size=3, progress=False)
    cache = TeacherCache(path)
    model = student(mistral).eval()
    cached = CrossTokenizerKDTrainer(model, make_args(tmp_path), student_tokenizer=mistral, train_dataset=cache)
    live = make_trainer(tmp_path, qwen, mistral, model, teacher, teacher_top_k=k, rows=rows)
    full = make_trainer(tmp_path, qwen, mistral, model, teacher, rows=rows)
    with torch.no_grad():
        for a in (0, 4):
            batch_c = cached.data_collator([cache[i] for i in range(a, a + 4)])
            assert batch_c["teacher_topk_ids"].shape[-1] == k
            loss_c = float(cached.compute_loss(model, batch_c))
            loss_l = float(live.compute_loss(model, live.data_collator(rows[a:a + 4])))
            loss_f = float(full.compute_loss(model, full.data_collator(rows[a:a + 4])))
            assert loss_c == pytest.approx(loss_l, abs=1e-5)
            assert abs(loss_c - loss_f) > 1e-4
    with pytest.raises(ValueError, match="max_length"):
        CrossTokenizerKDTrainer(model, make_args(tmp_path), student_tokenizer=mistral, train_dataset=cache,
                                max_length=MAX_LENGTH + 1)
    # Training from the cache needs no teacher at all.
    trained = student(mistral)
    trainer = CrossTokenizerKDTrainer(trained, make_args(tmp_path, max_steps=2), student_tokenizer=mistral,
                                      train_dataset=cache)
    assert trainer.teacher is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing skipped, nothing truncated to nothing
        trainer.train()
    assert all(math.isfinite(e["kd"]) and e["kd"] > 0 for e in train_logs(trainer))


# ---------------------------------------------------------------------- kd_balance
def test_dynamic_balance_sizes_the_kd_term_like_ce_without_a_gradient_through_the_ratio(tmp_path, qwen, mistral,
                                                                                        teacher):
    trainer = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, kd_weight=2.0, kd_balance="dynamic")
    trainer.train()
    for log in train_logs(trainer):  # KD scaled to CE's size: loss = CE + 2 * CE, whatever KD's own value
        assert log["loss"] == pytest.approx(3.0 * log["ce"], rel=1e-5)
        assert log["kd"] > 0 and abs(log["kd"] - log["ce"]) > 1e-3
    fixed = make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, kd_weight=2.0)
    batch = fixed.data_collator(ROWS[:4])
    model = student(mistral)
    dynamic = make_trainer(tmp_path, qwen, mistral, model, teacher, kd_weight=2.0, kd_balance="dynamic")
    grads = []
    for t in (fixed, dynamic):
        model.zero_grad()
        out = t.compute_loss(model, batch)
        out.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        t._kd_metrics["train"].clear()
    assert not torch.allclose(grads[0], grads[1])  # a different weight on KD's gradient, the same direction parts


@pytest.mark.parametrize(("options", "match"), [
    ({"kd_balance": "auto"}, "kd_balance='auto' is not one of 'fixed', 'dynamic'"),
    ({"kd_balance": "dynamic", "ce_weight": 0.0}, "kd_balance='dynamic' scales the KD term .* ce_weight=0"),
])
def test_bad_kd_balance_is_refused(tmp_path, qwen, mistral, teacher, options, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, qwen, mistral, student(mistral), teacher, **options)


def test_cli_checks_kd_balance_before_anything_loads():
    from xtok_kd.cli.distill_options import DistillArguments, check

    base = {"teacher": "smollm2", "student_config": "tiny", "student_tokenizer": "mistral", "data": "x.txt"}
    assert any("--kd-balance 'auto' is not one of fixed, dynamic" in p
               for p in check(DistillArguments(**base, kd_balance="auto"), output_dir="out"))
    assert any("--kd-balance dynamic" in p and "--ce-weight is 0" in p
               for p in check(DistillArguments(**base, kd_balance="dynamic", ce_weight=0.0), output_dir="out"))
