"""Cross-tokenizer loss benchmark: TRL GOLD ULDLoss against xtok_kd, side by side on identical inputs.

Inputs (identical for every method, rebuilt from a fixed seed): Qwen2.5 teacher logits 151,936 wide (the model's
padded width), Llama-3.2 student logits 128,256 wide, random N(0, 3^2); the real byte alignment of two passages of
the tiny-shakespeare corpus, each cut at its 256th student token. Each method runs forward + backward in its own
subprocess, so its peak memory is measured cleanly: the kernel's peak-RSS mark (VmHWM) is reset after the inputs
exist and read after the runs (fallback: a 1 ms RSS sampler). TRL runs once (it is slow); xtok_kd runs a warm-up
and ``--repeats`` timed runs (median).

    python benchmarks/bench_losses.py                 # all methods, table on stdout
    python benchmarks/bench_losses.py --methods xtok_uld,trl_uld
    python benchmarks/bench_losses.py --mixed          # numbers inserted: many multi-token chunks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XTOK_KD_SHARED", REPO.parent / "shared"))
TEACHER_WIDTH, STUDENT_WIDTH = 151_936, 128_256
METHODS = {
    "trl_uld": "TRL ULDLoss (extended, observed)",
    "trl_hybrid": "TRL ULDLoss hybrid (observed)",
    "xtok_uld": "xtok_kd uld (exact, observed)",
    "xtok_hybrid": "xtok_kd hybrid jsd (observed)",
    "xtok_proj_fkl": "xtok_kd projection + fkl",
    "xtok_proj_akl": "xtok_kd projection + akl",
    "xtok_proj_dkl": "xtok_kd projection + dkl (1, 1)",
    "xtok_sinkhorn": "xtok_kd sinkhorn (lexical, k=64)",
    "xtok_cdm": "xtok_kd cdm + fkl (k=32)",
    "xtok_alm": "xtok_kd alm (binary kl)",
}


# ---------------------------------------------------------------- memory
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakMeter:
    """Peak RSS above the RSS at ``start()``: the kernel's reset-able high-water mark, else a 1 ms sampler."""

    def start(self) -> None:
        self.base = _rss_kib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kernel = _hwm_kib() <= self.base + 1024
        except OSError:
            self.kernel = False
        self.sampled = self.base
        self.stop_flag = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop_flag:
            self.sampled = max(self.sampled, _rss_kib())
            time.sleep(0.001)

    def stop(self) -> float:
        """Peak MiB above the start."""
        self.stop_flag = True
        self.thread.join()
        peak = max(_hwm_kib(), self.sampled) if self.kernel else self.sampled
        return (peak - self.base) / 1024


# ---------------------------------------------------------------- inputs
def _mixed(text: str) -> str:
    """The passage with a number and an accented word after every 6th word: Qwen spells numbers digit by digit,
    Llama in groups of three, so many chunks are no longer one token on each side."""
    words = text.split(" ")
    return " ".join(w + (f" {1000 + 37 * i} café" if i % 6 == 5 else "") for i, w in enumerate(words))


def build_inputs(tokens: int, mixed: bool = False):
    import numpy as np
    import torch

    from xtok_kd.sequence import align_spans
    from xtok_kd.tokenizer import load_tokenizer

    teacher_tok = load_tokenizer(str(SHARED / "tokenizers" / "qwen2.5"))
    student_tok = load_tokenizer(str(SHARED / "tokenizers" / "llama3.2"))
    corpus = (SHARED / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    texts = []
    for start in (0, 20_000):
        text = corpus[start: start + 6 * tokens]
        text = _mixed(text) if mixed else text
        enc = student_tok.encode(text)
        cut = int(enc.spans[tokens][1])  # tokens content tokens after the BOS
        texts.append(text.encode("utf-8")[:cut].decode("utf-8", errors="ignore"))
    t_enc = [teacher_tok.encode(t) for t in texts]
    s_enc = [student_tok.encode(t) for t in texts]
    alignment = align_spans(t_enc, s_enc)
    lt, ls = max(map(len, t_enc)), max(map(len, s_enc))

    def pad(arrays, length):
        out = np.zeros((len(arrays), length) + arrays[0].shape[1:], dtype=np.int64)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = a
        return torch.as_tensor(out)

    g = torch.Generator().manual_seed(0)
    teacher = torch.empty(2, lt, TEACHER_WIDTH).normal_(0.0, 3.0, generator=g)
    student = torch.empty(2, ls, STUDENT_WIDTH).normal_(0.0, 3.0, generator=g)
    return SimpleNamespace(
        teacher_tok=teacher_tok, student_tok=student_tok, alignment=alignment, teacher=teacher, student=student,
        t_ids=pad([e.ids for e in t_enc], lt), s_ids=pad([e.ids for e in s_enc], ls),
        t_offsets=pad([e.spans for e in t_enc], lt), s_offsets=pad([e.spans for e in s_enc], ls),
        student_tokens=sum(len(e) - 1 for e in s_enc),
    )


# ---------------------------------------------------------------- methods
def trl_runner(x, *, hybrid: bool):
    import numpy as np
    import torch
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True,
        uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=0.5,
    )
    module = ULDLoss(config, student_tokenizer=x.student_tok.hf, teacher_tokenizer=x.teacher_tok.hf)
    al = x.alignment
    # Same equivalent setting as tests/test_trl_conformance.py: TRL's row j is our row j - 1, first chunk left out.
    t_labels = torch.full(x.t_ids.shape, -100)
    s_labels = torch.full(x.s_ids.shape, -100)
    for b in range(2):
        chunks = np.flatnonzero(al.chunk_sample == b)
        t0, s0 = int(al.teacher_first[chunks[1]]), int(al.student_first[chunks[1]])
        t1 = int(al.teacher_first[chunks[-1]] + al.teacher_count[chunks[-1]])
        s1 = int(al.student_first[chunks[-1]] + al.student_count[chunks[-1]])
        t_labels[b, t0:t1] = x.t_ids[b, t0:t1]
        s_labels[b, s0:s1] = x.s_ids[b, s0:s1]
    teacher = torch.cat([torch.zeros_like(x.teacher[:, :1]), x.teacher[:, :-1]], 1)
    student = torch.cat([torch.zeros_like(x.student[:, :1]), x.student[:, :-1]], 1)

    def run():
        s = student.detach().requires_grad_()
        loss = module(s, teacher, s_labels, t_labels, x.s_ids, x.t_ids, student_byte_offsets=x.s_offsets,
                      teacher_byte_offsets=x.t_offsets)
        loss.backward()
        return float(loss)

    return run


def xtok_runner(x, *, mapping: str, divergence: str = "fkl"):
    from xtok_kd.losses import CrossTokenizerKDLoss

    if mapping in ("projection", "sinkhorn", "cdm"):
        from xtok_kd.vocab import VocabAlignment

        table = VocabAlignment.build(x.teacher_tok, x.student_tok)
        extra = {"dkl_weights": (1.0, 1.0)} if divergence == "dkl" else {}
        module = CrossTokenizerKDLoss(table=table, mapping=mapping, divergence=divergence, **extra)
    elif mapping == "alm":
        module = CrossTokenizerKDLoss(mapping="alm", teacher_vocab_size=x.teacher_tok.vocab_size,
                                      student_vocab_size=x.student_tok.vocab_size)
    else:
        module = CrossTokenizerKDLoss(mapping=mapping, divergence="jsd", beta=0.5, merge="observed",
                                      table=_exact_table(x) if mapping == "hybrid" else None,
                                      teacher_vocab_size=x.teacher_tok.vocab_size,
                                      student_vocab_size=x.student_tok.vocab_size)

    def run():
        s = x.student.detach().requires_grad_()
        out = module(s, x.teacher, x.alignment, student_input_ids=x.s_ids, teacher_input_ids=x.t_ids)
        out.loss.backward()
        return float(out.loss)

    return run


def _exact_table(x):
    from xtok_kd.vocab import VocabAlignment

    return VocabAlignment.build(x.teacher_tok, x.student_tok)


def worker(method: str, tokens: int, repeats: int, mixed: bool) -> dict:
    import gc

    import torch

    def make(inputs):
        if method.startswith("trl"):
            return trl_runner(inputs, hybrid=method == "trl_hybrid")
        kind = {"xtok_uld": ("uld", "fkl"), "xtok_hybrid": ("hybrid", "jsd"),
                "xtok_proj_fkl": ("projection", "fkl"), "xtok_proj_akl": ("projection", "akl"),
                "xtok_proj_dkl": ("projection", "dkl"), "xtok_sinkhorn": ("sinkhorn", "fkl"),
                "xtok_cdm": ("cdm", "fkl"), "xtok_alm": ("alm", "fkl")}[method]
        return xtok_runner(inputs, mapping=kind[0], divergence=kind[1])

    # Page in every method's code on a 16-token input first, so the peak below is the loss's, not the libraries'.
    make(build_inputs(16, mixed))()
    gc.collect()
    x = build_inputs(tokens, mixed)
    run = make(x)
    warmup = not method.startswith("trl")  # TRL runs once: it is slow
    if not warmup:
        repeats = 1
    gc.collect()
    meter = PeakMeter()
    meter.start()
    if warmup:
        run()
    times, loss = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    peak = meter.stop()
    seconds = statistics.median(times)
    return {"method": method, "seconds": seconds, "tokens_per_s": x.student_tokens / seconds, "peak_mib": peak,
            "loss": loss, "tokens": x.student_tokens, "threads": torch.get_num_threads(),
            "one_to_one_share": x.alignment.one_to_one_share, "chunks": x.alignment.num_chunks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--tokens", type=int, default=256, help="student tokens per text (2 texts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads per method (default 1: on a shared 2-core machine, spinning OpenMP "
                             "threads that lose their core slow every method down several times)")
    parser.add_argument("--mixed", action="store_true",
                        help="insert numbers and accented words so that many chunks span several tokens")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.tokens, args.repeats, args.mixed)))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    results = {}
    for m in methods:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, "--worker", m, "--tokens", str(args.tokens),
                               "--repeats", str(args.repeats)] + (["--mixed"] if args.mixed else []),
                              capture_output=True, text=True, cwd=REPO, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{m} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[m] = json.loads(line[0][7:])
        r = results[m]
        print(f"  done {m}: {r['seconds']:.2f} s, {r['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    if not results:
        sys.exit(1)
    any_r = next(iter(results.values()))
    print(f"\n{any_r['tokens']} student tokens (2 texts), teacher logits {TEACHER_WIDTH} wide, student {STUDENT_WIDTH}; "
          f"{any_r['chunks']} chunks, {any_r['one_to_one_share']:.1%} one-to-one; forward+backward, CPU, "
          f"{any_r['threads']} threads\n")
    base_t = results.get("trl_uld")
    base_h = results.get("trl_hybrid")
    header = f"| {'method':34} | {'s / step':>9} | {'tokens/s':>9} | {'peak MiB':>9} | {'speed vs TRL':>12} | " \
             f"{'memory vs TRL':>13} | {'loss':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for m, r in results.items():
        ref = base_h if m == "xtok_hybrid" and base_h else base_t
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.1f}x" if ref else "-"
        mem = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref and ref["peak_mib"] > 0 else "-"
        print(f"| {METHODS[m]:34} | {r['seconds']:9.2f} | {r['tokens_per_s']:9.1f} | {r['peak_mib']:9.0f} | "
              f"{speed:>12} | {mem:>13} | {r['loss']:9.5f} |")
    print("\nspeed and memory ratios: against TRL hybrid for xtok_kd hybrid, against TRL extended ULD otherwise.")


if __name__ == "__main__":
    main()
