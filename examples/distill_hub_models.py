"""Distil a hub teacher into a hub student with another tokenizer, on a GPU: the pipeline of ``distill_tiny.py`` at
real scale.

    pip install -e ".[dev]" datasets accelerate
    python examples/distill_hub_models.py                                   # Qwen2.5-1.5B-Instruct -> Llama-3.2-1B
    python examples/distill_hub_models.py --text my_corpus.txt --steps 2000
    accelerate launch examples/distill_hub_models.py --batch-size 4 --grad-accum 8   # several GPUs (DDP)
    python examples/distill_hub_models.py --cache-teacher                   # teacher once, then train from its top-k

Defaults: teacher ``Qwen/Qwen2.5-1.5B-Instruct`` (151,665 ids), student ``meta-llama/Llama-3.2-1B`` (128,256 ids;
gated on the hub: accept its licence and ``huggingface-cli login`` first), both in bf16 on the GPU; text from a
``datasets`` corpus (default ``wikitext`` / ``wikitext-103-raw-v1``, column ``text``) or ``--text FILE``; the last
``--heldout`` passages are held out and never trained on.

What it does, as ``distill_tiny.py``: train the student twice from the same weights and data order through
``CrossTokenizerKDTrainer`` (CE only unless ``--no-baseline``, then CE + KD), and print held-out bits per byte for the
teacher, the student before training, and both trained students. With ``--cache-teacher`` the teacher runs once over
the training text (``write_teacher_cache``, top ``--teacher-top-k`` log-probabilities) and is freed before the
student trains; otherwise it runs live beside the student (needed by ``--mapping hybrid``, which reads full logits).

Memory (one 80 GB GPU, bf16): the 1.5B teacher ~3 GB, the 1B student with AdamW ~16 GB, plus activations and the
loss's chunk buffers (``--block-rows`` rows of 152k + 128k fp32 columns). Lower ``--batch-size`` and raise
``--grad-accum`` when short; the KD normalisation over the accumulated batch keeps the gradient the same.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

MAPPINGS = ("projection", "uld", "hybrid")
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "symmetric_kl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="Qwen/Qwen2.5-1.5B-Instruct", help="hub id, folder or .gguf file")
    ap.add_argument("--student", default="meta-llama/Llama-3.2-1B", help="hub id or folder (pretrained weights)")
    ap.add_argument("--text", default=None, help="a UTF-8 text file instead of a datasets corpus")
    ap.add_argument("--dataset", default="wikitext", help="a datasets corpus (when no --text)")
    ap.add_argument("--dataset-config", default="wikitext-103-raw-v1")
    ap.add_argument("--split", default="train")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--max-examples", type=int, default=20_000, help="passages read from the corpus")
    ap.add_argument("--heldout", type=int, default=200, help="passages held out for bits per byte")
    ap.add_argument("--passage-chars", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=1_000)
    ap.add_argument("--batch-size", type=int, default=8, help="per device")
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512, help="tokens per example on each side")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--mapping", default="projection", choices=MAPPINGS)
    ap.add_argument("--divergence", default="fkl", choices=DIVERGENCES)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--block-rows", type=int, default=512, help="aligned rows per loss block (GPU memory)")
    ap.add_argument("--teacher-top-k", type=int, default=None,
                    help="live teacher: feed the loss its top-k (default: full logits)")
    ap.add_argument("--cache-teacher", action="store_true", help="run the teacher once and train from its top-k")
    ap.add_argument("--cache-top-k", type=int, default=64)
    ap.add_argument("--no-baseline", action="store_true", help="skip the CE-only student")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="distill_hub_output")
    args = ap.parse_args(argv)
    errors = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
              for name in ("steps", "batch_size", "grad_accum", "max_length", "heldout", "block_rows")
              if getattr(args, name) < 1]
    if args.mapping == "hybrid" and (args.cache_teacher or args.teacher_top_k):
        errors.append("--mapping hybrid reads the teacher's full logits: drop --cache-teacher / --teacher-top-k")
    if errors:
        ap.error("; ".join(errors))
    return args


def read_passages(args: argparse.Namespace) -> list[str]:
    """Passages of about ``--passage-chars`` characters from ``--text`` or the ``datasets`` corpus."""
    if args.text is not None:
        paragraphs = Path(args.text).read_text(encoding="utf-8").split("\n\n")
    else:
        from datasets import load_dataset

        rows = load_dataset(args.dataset, args.dataset_config, split=args.split, streaming=True)
        paragraphs = []
        for row in rows:
            paragraphs.append(row[args.text_column])
            if len(paragraphs) >= 20 * args.max_examples:
                break
    out, current = [], ""
    for p in (p.strip() for p in paragraphs):
        if not p:
            continue
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= args.passage_chars:
            out.append(current)
            current = ""
            if len(out) >= args.max_examples:
                break
    return out + ([current] if current and len(out) < args.max_examples else [])


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from xtok_kd import load_tokenizer
    from xtok_kd.integrations.evaluate import bits_per_byte
    from xtok_kd.integrations.models import load_causal_lm, load_model_tokenizer
    from xtok_kd.integrations.trainer import CrossTokenizerKDTrainer

    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("warning: no GPU; this example is sized for one (see distill_tiny.py for a CPU run)", file=sys.stderr)
    passages = read_passages(args)
    if len(passages) <= args.heldout:
        raise SystemExit(f"only {len(passages)} passages: fewer than --heldout {args.heldout} + 1")
    train, heldout = passages[:-args.heldout], passages[-args.heldout:]
    examples = [{"text": t} for t in train]
    print(f"{len(train)} training passages, {len(heldout)} held out", flush=True)

    teacher = load_causal_lm(args.teacher, dtype=dtype, device=device)
    teacher_tok = load_tokenizer(load_model_tokenizer(args.teacher))
    student_hf = AutoTokenizer.from_pretrained(args.student)
    student_tok = load_tokenizer(student_hf)
    out = Path(args.output_dir)
    results = {"teacher": bits_per_byte(teacher, teacher_tok, heldout, max_length=args.max_length)}

    dataset: Any = examples
    live = teacher
    if args.cache_teacher:
        from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

        cache_dir = write_teacher_cache(teacher, teacher_tok, student_tok, examples, out / "teacher_cache",
                                        top_k=args.cache_top_k, max_length=args.max_length, batch_size=args.batch_size,
                                        teacher_name=args.teacher)
        dataset, live = TeacherCache(cache_dir), None
        del teacher
        torch.cuda.empty_cache() if device == "cuda" else None

    def train_one(label: str, kd_weight: float) -> Any:
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype).to(device)
        if "student_before" not in results:
            results["student_before"] = bits_per_byte(student, student_tok, heldout, max_length=args.max_length)
        training = TrainingArguments(
            output_dir=str(out / label), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
            warmup_ratio=0.03, bf16=args.dtype == "bfloat16", fp16=args.dtype == "float16", seed=args.seed,
            data_seed=args.seed, logging_steps=10, save_strategy="steps", save_steps=max(1, args.steps // 4),
            save_total_limit=1, report_to=[], disable_tqdm=False, gradient_checkpointing=True)
        trainer = CrossTokenizerKDTrainer(
            model=student, args=training, teacher_model=live if kd_weight > 0 else None,
            teacher_tokenizer=teacher_tok, student_tokenizer=student_tok, train_dataset=dataset,
            kd_weight=kd_weight, teacher_top_k=args.teacher_top_k if live is not None else None,
            max_length=None if args.cache_teacher else args.max_length,
            loss_options={"mapping": args.mapping, "divergence": args.divergence,
                          "temperature": args.temperature, "block_rows": args.block_rows} if kd_weight > 0 else None)
        print(f"\n--- student: {label} ---", flush=True)
        trainer.train()
        trainer.save_model(str(out / label / "final"))
        return student

    start = time.time()
    if not args.no_baseline:
        student = train_one("ce_only", 0.0)
        results["ce_only"] = bits_per_byte(student, student_tok, heldout, max_length=args.max_length)
        del student
    student = train_one("kd", args.kd_weight)
    results["kd"] = bits_per_byte(student, student_tok, heldout, max_length=args.max_length)
    print(f"\nheld-out bits per byte (lower is better), {args.steps} steps, {time.time() - start:.0f} s of training:\n")
    print("| model | bits/byte |\n|---|---|")
    print(f"| teacher {args.teacher} | {results['teacher']:.4f} |")
    print(f"| student {args.student} before training | {results['student_before']:.4f} |")
    if "ce_only" in results:
        print(f"| student CE only | {results['ce_only']:.4f} |")
    print(f"| student CE + KD ({args.mapping}/{args.divergence}, kd_weight {args.kd_weight:g}) | {results['kd']:.4f} |")
    if "ce_only" in results and math.isfinite(results["ce_only"]):
        results["gain"] = results["ce_only"] - results["kd"]
        print(f"| **gain of KD over CE only** | **{results['gain']:+.4f}** |")
    return results


if __name__ == "__main__":
    main()
