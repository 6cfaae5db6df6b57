"""Worker of ``tests/test_ddp.py``: train a tiny student with ``CrossTokenizerKDTrainer`` for a few steps.

Run under ``torchrun --nproc_per_node 2`` (DDP on CPU, gloo) or as a plain process (the single-process reference,
``--batch-size 4``). Each process writes into ``OUT``:

* ``rank{r}.json``: the hashes of the samples its ``compute_loss`` received (training only), and its training logs;
* ``rank{r}.pt``: the student's state dict after training.

Usage: ``python tests/_ddp_worker.py OUT [--batch-size N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from xtok_kd.assets import SAMPLE_TEXT, embedded_tokenizer
from xtok_kd.integrations import CrossTokenizerKDTrainer, tiny_llama
from xtok_kd.tokenizer import load_tokenizer

STEPS, MAX_LENGTH = 3, 40


class RecordingTrainer(CrossTokenizerKDTrainer):
    """Records a hash of each training sample (its unpadded student ids) that reaches ``compute_loss``."""

    seen: list[str]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            for ids, mask in zip(inputs["student_input_ids"], inputs["student_attention_mask"]):
                self.seen.append(hashlib.sha256(ids[mask.bool()].cpu().numpy().tobytes()).hexdigest()[:16])
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=2)
    opts = parser.parse_args()
    out = Path(opts.out)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))

    teacher_view = load_tokenizer(str(embedded_tokenizer("qwen2.5")))
    student_view = load_tokenizer(str(embedded_tokenizer("mistral")))
    texts = [p.strip() for p in SAMPLE_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rows = [{"text": t} for t in texts[: STEPS * opts.batch_size * world]]  # exactly one epoch, no padding rows
    teacher = tiny_llama(teacher_view.vocab_size, seed=1)
    student = tiny_llama(student_view.vocab_size, seed=2)  # same initial weights in every process

    args = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=opts.batch_size, max_steps=STEPS,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
        train_sampling_strategy="sequential", use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0, ddp_find_unused_parameters=False,
    )
    trainer = RecordingTrainer(student, args, teacher_model=teacher, teacher_tokenizer=teacher_view,
                               student_tokenizer=student_view, train_dataset=rows, max_length=MAX_LENGTH)
    trainer.seen = []
    trainer.train()
    assert trainer.args.world_size == world, (trainer.args.world_size, world)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    torch.save(state, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "seen": trainer.seen, "logs": logs,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    }))


if __name__ == "__main__":
    main()
