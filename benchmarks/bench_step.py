"""One training step of a student, side by side: CE only, same-tokenizer KD, and xtok_kd's cross-tokenizer KD.

Variants (each with its own copy of the same student and its own AdamW; the same text rows in every repetition):

* ``(a) CE``: tokenize the rows for the student (its fast tokenizer, padded), forward, CE, backward, optimizer step.
* ``(b) same-tokenizer KD``: (a) plus a teacher with the student's tokenizer (Mistral -> Mistral) and the plain
  token-level KL ``kl_div(log_softmax(s), log_softmax(t))`` over all positions, logits of equal widths: the floor any
  cross-tokenizer method pays. Loss ``CE + KL``.
* ``(c) xtok_kd``: Qwen2.5 teacher -> Mistral student through :class:`CrossTokenizerKDTrainer`: its collator
  (both tokenizations + alignment) and its ``compute_loss`` (``CE + KD``, ``--mapping``), backward, optimizer step.

The teacher forward (a live tiny Llama with the teacher's vocabulary) is timed apart in (b) and (c) and left out of
their step times: it is the same model cost whatever the method (or zero with a teacher cache). Repetitions are
interleaved (a, b, c, then b, c, a, ...) and medians reported, since the machine is noisy; the (c)/(b) ratio is the
median of each repetition's own ratio.

    python benchmarks/bench_step.py                                  # defaults: about 1-2 minutes on 2 CPUs
    python benchmarks/bench_step.py --steps 20 --batch-size 8 --max-length 256 --mapping uld
    python benchmarks/bench_step.py --clock cpu                      # CPU time: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch

from xtok_kd.assets import SAMPLE_TEXT, embedded_tokenizer
from xtok_kd.integrations import CrossTokenizerKDTrainer, tiny_llama
from xtok_kd.tokenizer import load_tokenizer

TARGET = 1.25


class Clock:
    """Seconds spent in named sections during the current step (device-synchronised), on two clocks: ``wall``
    (elapsed) and ``cpu`` (this process's CPU time, all threads: far less sensitive to other processes sharing the
    cores; on a GPU it misses the device's time)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.parts = device, {"wall": {}, "cpu": {}}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def part(self, name: str):
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            for kind, spent in (("wall", time.perf_counter() - wall), ("cpu", time.process_time() - cpu)):
                self.parts[kind][name] = self.parts[kind].get(name, 0.0) + spent

    def take(self) -> dict[str, dict[str, float]]:
        parts, self.parts = self.parts, {"wall": {}, "cpu": {}}
        return parts


def text_rows(batch: int, max_length: int, rep: int) -> list[dict[str, str]]:
    """``batch`` windows of the sample text, each long enough to fill ``max_length`` tokens (about 4 characters a
    token), starting at other offsets in every repetition."""
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    width = 5 * max_length
    rows = []
    for b in range(batch):
        start = ((rep * batch + b) * 997) % max(1, len(text) - width)
        rows.append({"text": text[start:start + width]})
    return rows


class TimedTrainer(CrossTokenizerKDTrainer):
    """Times the teacher (forward, and its top-k when asked) and the KD loss inside ``compute_loss``."""

    clock: Clock

    def _teacher_input(self, inputs: Any) -> Any:
        with self.clock.part("teacher"):
            return super()._teacher_input(inputs)


class TimedLoss:
    """A proxy that times the KD loss module's call (its forward computes the gradient block by block)."""

    def __init__(self, loss: Any, clock: Clock) -> None:
        self.loss, self.clock = loss, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.clock.part("kd_loss"):
            return self.loss(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions of each variant (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--mapping", default="projection", choices=["projection", "uld", "hybrid"])
    parser.add_argument("--teacher-top-k", type=int, default=None, help="(c): feed the loss the teacher's top-k")
    parser.add_argument("--hidden", type=int, default=256, help="student and teacher hidden size")
    parser.add_argument("--layers", type=int, default=4, help="student and teacher layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="the table's clock: wall (elapsed) or cpu (process CPU time, steadier on a shared "
                             "machine; CPU runs only); the (c)/(b) ratio is printed on both")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    clock = Clock(device)

    from transformers import TrainingArguments

    qwen = load_tokenizer(str(embedded_tokenizer("qwen2.5")))
    mistral = load_tokenizer(str(embedded_tokenizer("mistral")))
    hf = mistral.hf
    pad_id = next((i for i in (hf.pad_token_id, hf.eos_token_id) if i is not None), 0)  # as the collator pads
    size = {"hidden_size": opts.hidden, "layers": opts.layers, "heads": max(1, opts.hidden // 64),
            "kv_heads": max(1, opts.hidden // 128)}
    students = {v: tiny_llama(mistral.vocab_size, seed=0, **size).to(device) for v in "abc"}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in students.items()}
    same_teacher = tiny_llama(mistral.vocab_size, seed=1, **size).to(device).eval().requires_grad_(False)
    cross_teacher = tiny_llama(qwen.vocab_size, seed=1, **size).to(device).eval().requires_grad_(False)
    args = TrainingArguments(output_dir="/tmp/xtok_kd_bench_step", report_to=[], use_cpu=device.type == "cpu",
                             disable_tqdm=True)
    trainer = TimedTrainer(students["c"], args, teacher_model=cross_teacher, teacher_tokenizer=qwen,
                           student_tokenizer=mistral, max_length=opts.max_length, teacher_top_k=opts.teacher_top_k,
                           loss_options={"mapping": opts.mapping})
    trainer.clock = clock
    trainer.kd_loss = TimedLoss(trainer.kd_loss, clock)

    def student_batch(rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        encoded = hf([r["text"] for r in rows], truncation=True, max_length=opts.max_length)["input_ids"]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for b, e in enumerate(encoded):
            ids[b, :len(e)], mask[b, :len(e)] = torch.tensor(e), 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def ce_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # as compute_loss does it
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def step_a(rows):
        model, opt = students["a"], optimizers["a"]
        with clock.part("data"):
            batch = student_batch(rows)
        with clock.part("step"):
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce_of(logits, batch["labels"]).backward()
            opt.step()

    def step_b(rows):
        model, opt = students["b"], optimizers["b"]
        with clock.part("data"):
            batch = student_batch(rows)
        with clock.part("teacher"), torch.no_grad():
            t_logits = same_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with clock.part("step"):
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with clock.part("kd_loss"):  # every position, padding included: the plain floor
                kl = torch.nn.functional.kl_div(torch.log_softmax(logits.flatten(0, 1).float(), -1),
                                                torch.log_softmax(t_logits.flatten(0, 1).float(), -1),
                                                log_target=True, reduction="batchmean")
            (ce_of(logits, batch["labels"]) + kl).backward()
            opt.step()

    def step_c(rows):
        model, opt = students["c"], optimizers["c"]
        with clock.part("data"):
            batch = trainer._prepare_inputs(trainer.data_collator(rows))
        with clock.part("step"):
            opt.zero_grad(set_to_none=True)
            counts = trainer._get_num_items_in_batch([batch], device)
            trainer.compute_loss(model, batch, num_items_in_batch=counts).backward()
            opt.step()

    from xtok_kd import data as data_module

    align = data_module.align_spans

    def timed_align(*a, **k):
        with clock.part("align"):
            return align(*a, **k)

    data_module.align_spans = timed_align
    steps = {"a": step_a, "b": step_b, "c": step_c}
    runs: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in steps}
    order = list(steps)
    for rep in range(opts.steps + 1):
        rows = text_rows(opts.batch_size, opts.max_length, rep)
        for v in order:
            steps[v](rows)
            parts = clock.take()
            if rep:  # repetition 0 warms up
                runs[v].append(parts)
        order = order[1:] + order[:1]
    data_module.align_spans = align

    def totals(v: str, kind: str) -> list[float]:  # each repetition's step without the teacher forward
        return [p[kind]["data"] + p[kind]["step"] - (p[kind].get("teacher", 0.0) if v == "c" else 0.0)
                for p in runs[v]]

    def total(v: str) -> float:
        return statistics.median(totals(v, opts.clock))

    def med(v: str, *names: str) -> float:
        return statistics.median(sum(p[opts.clock].get(n, 0.0) for n in names) for p in runs[v])

    labels = {"a": "(a) CE only (mistral)", "b": "(b) same-tok KD mistral->mistral, KL",
              "c": f"(c) xtok_kd qwen2.5->mistral, {opts.mapping}"
                   + (f", top-{opts.teacher_top_k}" if opts.teacher_top_k else "")}
    n_params = sum(p.numel() for p in students["a"].parameters())
    print(f"device {device}, threads {torch.get_num_threads()}; student tiny Llama {n_params / 1e6:.1f}M params "
          f"(hidden {opts.hidden}, {opts.layers} layers, vocab {mistral.vocab_size}); teachers: same size, vocab "
          f"{mistral.vocab_size} (b) / {qwen.vocab_size} (c); batch {opts.batch_size} x <= {opts.max_length} "
          f"tokens; {opts.steps} repetitions, medians (ms, {opts.clock} clock)")
    print()
    w = max(len(label) for label in labels.values())
    header = f"{'variant':<{w}} {'step':>8} {'data':>8} {'kd loss':>8} {'teacher fwd':>12} {'vs (a)':>7}"
    print(header)
    print("-" * len(header))
    for v in steps:
        kd = med(v, "kd_loss") if v != "a" else 0.0
        teacher = f"{1e3 * med(v, 'teacher'):12.1f}" if v != "a" else f"{'-':>12}"
        print(f"{labels[v]:<{w}} {1e3 * total(v):8.1f} {1e3 * med(v, 'data'):8.1f} {1e3 * kd:8.1f} {teacher} "
              f"{total(v) / total('a'):6.2f}x")
    print("step: data + forward + loss + backward + AdamW, teacher forward excluded; kd loss: (b) the KL's forward "
          "(its backward is in autograd's), (c) the KD module's call, which computes its gradient block by block; "
          "teacher fwd: its forward (and, with --teacher-top-k, the top-k of its log-softmax)")
    print()
    # Ratios within each repetition (its variants ran back to back) drift less with the machine's load than the
    # ratio of medians.
    for kind in ("wall", "cpu") if device.type == "cpu" else ("wall",):
        ratios = sorted(c / b for c, b in zip(totals("c", kind), totals("b", kind)))
        ratio = statistics.median(ratios)
        medians = statistics.median(totals("c", kind)) / statistics.median(totals("b", kind))
        print(f"(c)/(b), {kind} clock, step without the teacher forward: {ratio:.2f}x, median of the repetitions' "
              f"ratios (range {ratios[0]:.2f}-{ratios[-1]:.2f}; ratio of the medians {medians:.2f}x); target <= "
              f"{TARGET:.2f}x: {'met' if ratio <= TARGET else 'NOT met'}")
    c_total = total("c")
    collation = med("c", "data") - med("c", "align")
    shares = {"collation (tokenize both sides, pad, labels)": collation, "alignment (align_spans)": med("c", "align"),
              "KD loss (forward, gradient inside)": med("c", "kd_loss")}
    shares["student fwd + CE + backward + AdamW"] = c_total - sum(shares.values())
    print("share of (c):")
    for name, value in shares.items():
        print(f"  {name:<46} {1e3 * value:8.1f} ms {100 * value / c_total:5.1f}%")
    extra = c_total - total("a")
    print(f"(c) over (a): +{1e3 * extra:.1f} ms; of it collation+alignment {1e3 * med('c', 'data'):.1f} ms "
          f"(minus (a)'s student tokenization {1e3 * med('a', 'data'):.1f} ms), KD loss {1e3 * med('c', 'kd_loss'):.1f} ms")


if __name__ == "__main__":
    main()
