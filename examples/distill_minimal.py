"""A minimal cross-tokenizer distillation loop: copy it and put your own models in.

    python examples/distill_minimal.py                          # embedded Qwen2.5 -> Mistral tokenizers, tiny models
    python examples/distill_minimal.py --teacher Qwen/Qwen2.5-0.5B-Instruct --student meta-llama/Llama-3.2-1B \\
        --pretrained                                             # real models from the hub (needs network)

Without ``--pretrained`` both models are tiny randomly initialised transformers with the tokenizers' vocabularies,
so the loop runs anywhere in seconds; it shows the wiring, not a useful student. The three pieces:

1. ``CrossTokenizerCollator`` tokenizes each text for both models and aligns them byte-exactly;
2. ``collator.table`` is the vocabulary table (built on first use, then cached on disk);
3. ``CrossTokenizerKDLoss`` compares the aligned rows; add it to the student's own cross-entropy.
"""

from __future__ import annotations

import argparse

import torch

from xtok_kd import CrossTokenizerCollator, CrossTokenizerKDLoss, load_tokenizer
from xtok_kd.assets import SAMPLE_TEXT


def tiny_model(vocab_size: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def passages(text: str, *, size: int) -> list[str]:
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out, current = [], ""
    for p in paragraphs:
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= size:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="qwen2.5")
    ap.add_argument("--student", default="mistral")
    ap.add_argument("--pretrained", action="store_true", help="load the models' weights from the hub or a folder")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    teacher_tok, student_tok = load_tokenizer(args.teacher), load_tokenizer(args.student)
    if args.pretrained:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
        student = AutoModelForCausalLM.from_pretrained(args.student)
    else:
        teacher = tiny_model(teacher_tok.vocab_size, seed=0)
        student = tiny_model(student_tok.vocab_size, seed=1)
    teacher.eval().requires_grad_(False)

    collator = CrossTokenizerCollator(teacher_tok, student_tok, max_length=args.max_length)
    kd = CrossTokenizerKDLoss(table=collator.table, mapping="projection", divergence="fkl")  # built once, cached
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)

    texts = passages(SAMPLE_TEXT.read_text(encoding="utf-8"), size=300)
    metrics: dict[str, float] = {}
    for step in range(args.steps):
        batch_texts = [texts[(step * args.batch_size + i) % len(texts)] for i in range(args.batch_size)]
        batch = collator([{"text": t} for t in batch_texts])
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                     attention_mask=batch["teacher_attention_mask"]).logits
        out = student(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"],
                      labels=batch["student_labels"])
        kd_out = kd(out.logits, teacher_logits, batch["alignment"])
        loss = out.loss + args.kd_weight * kd_out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"step": step, "ce": out.loss.item(), "kd": kd_out.loss.item(), **kd_out.metrics}
        if step % 5 == 0 or step == args.steps - 1:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(shown, flush=True)
    return metrics


if __name__ == "__main__":
    main()
