"""Data parallelism: ``CrossTokenizerKDTrainer`` under ``torchrun --nproc_per_node 2`` on CPU (gloo).

The worker (``tests/_ddp_worker.py``) trains a tiny student for a few SGD steps; every process writes the samples it
received and its final weights. The ranks must see different samples, end with identical weights, and match a
single process that takes both ranks' samples per step (twice the per-device batch): the loss is normalised over
the label tokens and chunks of all processes, so data parallelism gives the gradient of the big batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
TIMEOUT = 240

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], out: Path) -> None:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run([sys.executable, *argv, str(out)], env=env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False, cwd=str(WORKER.parents[1]))
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(argv)} did not finish within {TIMEOUT} s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-6000:]}"


def _read(out: Path, rank: int) -> tuple[dict, dict]:
    return json.loads((out / f"rank{rank}.json").read_text()), torch.load(out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for attempt in range(2):  # a port taken between _free_port() and torchrun's bind: try once more
        port = _free_port()
        try:
            _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(port), str(WORKER)], root / f"ddp{attempt}")
            ddp = root / f"ddp{attempt}"
            break
        except AssertionError as err:
            if attempt or "address already in use" not in str(err).lower():
                raise
    _run([str(WORKER), "--batch-size", "4"], root / "single")
    return [_read(ddp, 0), _read(ddp, 1)], _read(root / "single", 0)


def test_ranks_see_different_samples_and_end_with_identical_weights(runs):
    (info0, weights0), (info1, weights1) = runs[0]
    assert info0["world_size"] == info1["world_size"] == 2 and info0["backend"] == "gloo"
    assert len(info0["seen"]) == len(info1["seen"]) == 6  # 3 steps x 2 samples
    assert not set(info0["seen"]) & set(info1["seen"])
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), name
    # Metrics are reduced over the processes: every rank logs the same values.
    assert info0["logs"] == info1["logs"] and len(info0["logs"]) == 3


def test_two_processes_equal_one_process_with_twice_the_batch(runs):
    (info0, weights0), (info1, _) = runs[0]
    single, weights = runs[1]
    assert set(info0["seen"]) | set(info1["seen"]) == set(single["seen"])
    from xtok_kd.integrations import tiny_llama

    initial = tiny_llama(weights["model.embed_tokens.weight"].shape[0], seed=2).state_dict()  # the worker's student
    for name in weights:
        torch.testing.assert_close(weights0[name], weights[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(weights["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    for ddp, one in zip(info0["logs"], single["logs"]):
        assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-5)  # normalised over both ranks' tokens and chunks
        assert 2 * ddp["chunks"] == pytest.approx(one["chunks"])  # mean per device batch, over both ranks
