"""Teacher top-k cache: round trip against the live teacher, resume, refusals, and ``xtok-kd cache-teacher``."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from xtok_kd import CrossTokenizerCollator, CrossTokenizerKDLoss
from xtok_kd.assets import SAMPLE_TEXT
from xtok_kd.integrations.models import tiny_llama
from xtok_kd.losses import TeacherTopK
from xtok_kd.teacher_cache import (
    TeacherCache,
    collate_teacher_topk,
    teacher_topk,
    write_teacher_cache,
)

K, MAX_LENGTH, BATCH, SHARD = 8, 40, 3, 4
CHAT = {"messages": [{"role": "user", "content": "Who speaks first?"},
                     {"role": "assistant", "content": "The First Citizen: hear me speak."}]}
EXAMPLES = [{"text": p} for p in SAMPLE_TEXT.read_text(encoding="utf-8").split("\n\n")[:8]] + [
    {"text": ""}, CHAT, {"text": "Speak, speak. " * 20, "id": "long"}]


@pytest.fixture(scope="module")
def teacher(qwen):
    return tiny_llama(qwen.vocab_size, seed=0).eval()


class Forwards:
    """Counts teacher forwards; raises on forward number ``fail_at`` (1-based) to simulate a crash."""

    def __init__(self, model, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def write(teacher, qwen, mistral):
    """``write(out, **options)``: write_teacher_cache with the tiny teacher, qwen2.5 -> mistral, small shards."""

    def run(out, examples=EXAMPLES, student=mistral, **kw):
        opts = {"top_k": K, "max_length": MAX_LENGTH, "batch_size": BATCH, "shard_size": SHARD, "progress": False,
                **kw}
        return write_teacher_cache(teacher, qwen, student, examples, out, **opts)

    return run


@pytest.fixture(scope="module")
def collator(qwen, mistral):
    return CrossTokenizerCollator(qwen, mistral, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def cache_dir(teacher, write, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    with Forwards(teacher) as fw:
        write(out)
    assert fw.calls == 5  # shards of 4, 4, 3 examples in batches of 3: 2 + 2 + 1 forwards
    return out


def _shard_hashes(path):
    return [s["sha256"] for s in json.loads((path / "manifest.json").read_text())["shards"]]


def _next_token_reference(logits, input_ids, attention_mask, vocab):
    """``log_softmax(logits)`` at each next input id, computed directly: 0 where i + 1 is not attended or past L."""
    full = torch.log_softmax(logits[..., :vocab].double(), -1)
    ref = torch.zeros(input_ids.shape, dtype=torch.float64)
    mask = attention_mask.bool()
    for b in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1] - 1):
            if mask[b, i] and mask[b, i + 1]:
                ref[b, i] = full[b, i, input_ids[b, i + 1]]
    return ref


def _set_version(path, version):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = version
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_teacher_topk_cuts_padding_and_clamps_k():
    logits = torch.randn(2, 3, 10, dtype=torch.bfloat16)
    ids, lps = teacher_topk(logits, 4, vocab_size=7)
    ref = torch.log_softmax(logits[..., :7].float(), -1).topk(4, -1)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.shape == (2, 3, 4)
    assert torch.equal(ids, ref.indices) and torch.equal(lps, ref.values) and int(ids.max()) < 7
    assert teacher_topk(logits, 50, vocab_size=7)[0].shape == (2, 3, 7)
    with pytest.raises(ValueError, match="10 columns but vocab_size is 12"):
        teacher_topk(logits, 4, vocab_size=12)


def test_teacher_topk_gives_next_token_logprobs_where_the_mask_reads():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 10, dtype=torch.bfloat16)
    input_ids = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    input_ids[1, 3:] = 9  # padding ids outside the vocabulary are never read
    ids, lps, nxt = teacher_topk(logits, 4, vocab_size=7, input_ids=input_ids, attention_mask=mask)
    assert nxt.shape == (3, 5) and nxt.dtype == torch.float32
    plain = teacher_topk(logits, 4, vocab_size=7)
    assert len(plain) == 2 and torch.equal(plain[0], ids) and torch.equal(plain[1], lps)  # unchanged without ids
    ref = _next_token_reference(logits, input_ids, mask, 7)
    assert torch.allclose(nxt.double(), ref, atol=1e-6)
    assert bool((ref[1, 2:] == 0).all()) and bool((nxt[1, 2:] == 0).all()) and bool((nxt[2] == 0).all())
    hits = (ids[:, :-1] == input_ids[:, 1:, None]) & mask[:, :-1, None].bool() & mask[:, 1:, None].bool()
    b, i, j = hits.nonzero(as_tuple=True)
    assert len(b) and torch.equal(nxt[b, i], lps[b, i, j])  # a next token inside the top-k has its top-k value exactly
    unmasked = teacher_topk(logits, 4, vocab_size=7, input_ids=input_ids.clamp(max=6))[2]
    assert torch.equal(unmasked[0], nxt[0]) and unmasked[1, 3] != 0 and bool((unmasked[:, -1] == 0).all())
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 8 is not a teacher id in \[0, 7\)"):
        teacher_topk(logits, 4, vocab_size=7, input_ids=input_ids.index_put((torch.tensor(0), torch.tensor(2)),
                                                                            torch.tensor(8)))
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\) = \(3, 5\) integer tensor"):
        teacher_topk(logits, 4, input_ids=input_ids[:, :4])
    with pytest.raises(ValueError, match="attention_mask must be"):
        teacher_topk(logits, 4, input_ids=input_ids, attention_mask=mask[:2])


def test_round_trip_equals_live_teacher_exactly(cache_dir, teacher, qwen, mistral, collator):
    cache = TeacherCache(cache_dir, teacher=qwen, student=mistral)
    assert len(cache) == len(EXAMPLES) and cache.top_k == K and cache.max_length == MAX_LENGTH
    assert cache.loss_on == "all" and cache.teacher_fingerprint == qwen.fingerprint
    assert cache.teacher_tokenizer.fingerprint == qwen.fingerprint  # saved with the cache
    batches = [list(range(a, min(a + BATCH, s + SHARD, len(EXAMPLES))))  # the writer's batches, shard by shard
               for s in range(0, len(EXAMPLES), SHARD) for a in range(s, min(s + SHARD, len(EXAMPLES)), BATCH)]
    for rows in batches:
        batch = collator([EXAMPLES[i] for i in rows])
        with torch.no_grad():
            logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
        ids, lps, nxt = teacher_topk(logits, K, qwen.vocab_size, input_ids=batch["teacher_input_ids"],
                                     attention_mask=batch["teacher_attention_mask"])
        ref = _next_token_reference(logits, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                    qwen.vocab_size)
        for b, i in enumerate(rows):
            n = int(batch["teacher_attention_mask"][b].sum())
            row = cache[i]
            assert {k: v for k, v in row.items() if not k.startswith("teacher_")} == EXAMPLES[i]
            assert row["teacher_topk_ids"].dtype == np.int64 and row["teacher_topk_logprobs"].dtype == np.float32
            assert np.array_equal(row["teacher_input_ids_cached"], batch["teacher_input_ids"][b, :n].numpy())
            assert np.array_equal(row["teacher_topk_ids"], ids[b, :n].numpy())
            assert np.array_equal(row["teacher_topk_logprobs"], lps[b, :n].numpy())  # bit-identical
            cached_next = row["teacher_next_token_logprobs"]
            assert cached_next.dtype == np.float32 and cached_next.shape == (n,)
            assert np.array_equal(cached_next, nxt[b, :n].numpy())  # bit-identical
            # log_softmax(teacher logits) at the next input id, in padded batches too; 0 at the last token
            assert np.allclose(cached_next, ref[b, :n].numpy(), atol=1e-5, rtol=0)
            assert n == 0 or (cached_next[-1] == 0 and bool((cached_next[:-1] < 0).all()))
    assert any(int(m.sum()) < m.shape[0] for m in collator([EXAMPLES[i] for i in range(3)])["teacher_attention_mask"])
    assert cache[8]["teacher_topk_ids"].shape == (0, K) and cache[8]["teacher_next_token_logprobs"].shape == (0,)
    assert cache[-1]["id"] == "long"
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers: open shard handles are not carried over
    assert np.array_equal(clone[5]["teacher_topk_logprobs"], cache[5]["teacher_topk_logprobs"])
    with pytest.raises(IndexError):
        cache[len(EXAMPLES)]


def test_collate_pads_and_loss_equals_live_teacher(cache_dir, teacher, qwen, mistral, collator):
    cache = TeacherCache(cache_dir, verify=False)
    rows = [cache[i] for i in (0, 8, 9, 10)]  # a text, an empty text, a chat, a truncated text
    batch = collator(rows)
    ids, lps, nxt = collate_teacher_topk(rows, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    mask = batch["teacher_attention_mask"].bool()
    assert ids.shape == lps.shape == (*mask.shape, K) and ids.dtype == torch.int64 and lps.dtype == torch.float32
    assert bool((ids[~mask] == -1).all()) and bool(torch.isinf(lps[~mask]).all()) and bool((lps[~mask] < 0).all())
    assert bool((ids[mask] >= 0).all()) and not mask[1].any() and mask[3].all()
    assert nxt.shape == mask.shape and nxt.dtype == torch.float32 and bool((nxt[~mask] == 0).all())
    with torch.no_grad():
        logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    live = TeacherTopK(*teacher_topk(logits, K, qwen.vocab_size, input_ids=batch["teacher_input_ids"],
                                     attention_mask=batch["teacher_attention_mask"]))
    # the collated cache gives what the live teacher gives on this batch, zeros (never read) in the same places
    assert torch.allclose(nxt, live.next_token_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(nxt == 0, live.next_token_logprobs == 0)
    ref = _next_token_reference(logits, batch["teacher_input_ids"], batch["teacher_attention_mask"], qwen.vocab_size)
    assert torch.allclose(nxt.double(), ref, atol=1e-5, rtol=0)
    loss = CrossTokenizerKDLoss(teacher=qwen, student=mistral)
    torch.manual_seed(1)
    student_logits = torch.randn(*batch["student_input_ids"].shape, 32000)
    cached = loss(student_logits, TeacherTopK(ids, lps, nxt), batch).loss
    reference = loss(student_logits, live, batch).loss
    assert torch.isfinite(cached) and abs(float(cached) - float(reference)) <= 1e-5


def test_collate_refuses_ids_of_another_max_length(cache_dir, qwen, mistral):
    cache = TeacherCache(cache_dir, verify=False)
    rows = [cache[10]]
    batch = CrossTokenizerCollator(qwen, mistral, max_length=20)(rows)
    with pytest.raises(ValueError, match=r"example 0 .*lengths differ: cached 40, collated 20.*max_length"):
        collate_teacher_topk(rows, batch["teacher_input_ids"], batch["teacher_attention_mask"])


def test_resume_keeps_finished_shards_and_matches_an_uninterrupted_run(cache_dir, teacher, write, tmp_path):
    from xtok_kd.vocab.files import _host

    out = tmp_path / "c"
    with Forwards(teacher, fail_at=3), pytest.raises(RuntimeError, match="simulated crash"):
        write(out)  # dies on the first forward of shard 1
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    with pytest.raises(ValueError, match=r"incomplete: 4 of 11 examples.*cache-teacher.*same options"):
        TeacherCache(out)
    (out / "shard-00001.safetensors").write_bytes(b"half a shard")  # renamed in place, manifest never updated
    temp = out / f".shard-00001.safetensors.xtok-tmp-{_host()}-999999999-0123456789ab"
    temp.write_bytes(b"partial")
    with Forwards(teacher) as fw:
        write(out)
    assert fw.calls == 3  # shards 1 and 2 only
    assert _shard_hashes(out) == _shard_hashes(cache_dir) and not temp.exists()
    assert len(TeacherCache(out)) == len(EXAMPLES)
    with Forwards(teacher) as fw:
        write(out)  # a finished cache: nothing to do
    assert fw.calls == 0 and _shard_hashes(out) == _shard_hashes(cache_dir) and len(TeacherCache(out)) == 11


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete", "arrays", "no_next_token"])
def test_damaged_shard_is_refused_then_rebuilt(cache_dir, teacher, write, tmp_path, damage):
    from safetensors.numpy import load_file, save_file

    from xtok_kd.teacher_cache import _sha256

    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:-10])
    elif damage == "corrupt":
        shard.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
    elif damage == "delete":
        shard.unlink()
    else:  # a well-formed file whose arrays do not fit its manifest entry (size and sha256 updated to match)
        arrays = load_file(shard)
        if damage == "arrays":
            arrays["topk_ids"] = arrays["topk_ids"][:, :4].copy()
        else:  # a version-1 shard
            del arrays["next_token_logprobs"]
        save_file(arrays, shard)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["shards"][1].update(bytes=shard.stat().st_size, sha256=_sha256(shard))
        (out / "manifest.json").write_text(json.dumps(manifest))
    want = {"truncate": "bytes but the manifest says", "corrupt": "corrupt: its sha256", "delete": "is missing",
            "arrays": "arrays .* disagree with the manifest", "no_next_token": "cannot be read"}[damage]
    with pytest.raises(ValueError, match=rf"shard-00001\.safetensors.*{want}.*cache-teacher.*same options"):
        TeacherCache(out)
    with Forwards(teacher) as fw:
        write(out)
    assert fw.calls == 2 and _shard_hashes(out) == _shard_hashes(cache_dir)


def test_corrupt_manifest_is_refused(cache_dir, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json' is corrupt.*cache-teacher"):
        TeacherCache(out)
    with pytest.raises(ValueError, match="has no manifest.json"):
        TeacherCache(tmp_path)


def test_a_version_1_cache_is_refused_and_rebuilt_with_overwrite(cache_dir, write, teacher, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    _set_version(out, 1)
    want = (r"manifest\.json' has format version 1; this xtok_kd reads version 2 \(version 2 adds the teacher's "
            r"log-probability of each next token\)\. Fix: rebuild the cache with `xtok-kd cache-teacher \.\.\. -o "
            rf"{out}.*--overwrite`")
    with pytest.raises(ValueError, match=want):
        TeacherCache(out)
    with Forwards(teacher) as fw, pytest.raises(ValueError, match=want):
        write(out)  # its shards are not resumed, and it is replaced on request only
    assert fw.calls == 0 and json.loads((out / "manifest.json").read_text())["version"] == 1
    with Forwards(teacher) as fw:
        write(out, overwrite=True)
    assert fw.calls == 5 and _shard_hashes(out) == _shard_hashes(cache_dir) and len(TeacherCache(out)) == 11


def test_trainer_batches_carry_the_next_token_logprobs(cache_dir, teacher, qwen, collator):
    from types import SimpleNamespace

    from xtok_kd.integrations.trainer import (
        CrossTokenizerKDTrainer,
        DistillationCollator,
    )

    cache = TeacherCache(cache_dir, verify=False)
    rows = [cache[i] for i in (0, 8, 9, 10)]
    batch = DistillationCollator(collator)(rows)
    ids, lps, nxt = collate_teacher_topk(rows, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    assert torch.equal(batch["teacher_next_token_logprobs"], nxt)
    from_cache = CrossTokenizerKDTrainer._teacher_input(SimpleNamespace(teacher=None), batch)
    assert isinstance(from_cache, TeacherTopK) and torch.equal(from_cache.next_token_logprobs, nxt)
    assert torch.equal(from_cache.ids, ids) and torch.equal(from_cache.logprobs, lps)
    plain = collator([EXAMPLES[i] for i in (0, 8, 9, 10)])
    assert "teacher_next_token_logprobs" not in plain
    live_trainer = SimpleNamespace(teacher=teacher, teacher_top_k=K, teacher_view=qwen)
    live = CrossTokenizerKDTrainer._teacher_input(live_trainer, plain)
    assert live.next_token_logprobs.shape == nxt.shape and torch.allclose(live.next_token_logprobs, nxt, atol=1e-5)
    assert torch.equal(live.ids[batch["teacher_attention_mask"].bool()], ids[batch["teacher_attention_mask"].bool()])
    full = CrossTokenizerKDTrainer._teacher_input(SimpleNamespace(teacher=teacher, teacher_top_k=None), plain)
    assert isinstance(full, torch.Tensor) and full.shape[:2] == nxt.shape  # the full-logits path is unchanged


def test_check_pair_names_both_fingerprints(cache_dir, qwen, mistral, gpt2):
    cache = TeacherCache(cache_dir, verify=False)
    cache.check_pair(qwen, mistral)
    with pytest.raises(ValueError, match=rf"student tokenizer .*{gpt2.fingerprint}.*expects "
                                         rf"{cache.student_fingerprint} \('.*mistral'\)"):
        TeacherCache(cache_dir, teacher=qwen, student=gpt2)
    with pytest.raises(ValueError, match=rf"teacher tokenizer .*{gpt2.fingerprint}.*expects "
                                         rf"{cache.teacher_fingerprint}.*student tokenizer"):
        cache.check_pair(gpt2, gpt2)


def test_other_settings_and_foreign_folders_are_refused(cache_dir, write, gpt2, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    with pytest.raises(ValueError, match=r"top_k: cache 8, now 4.*another folder.*--overwrite"):
        write(out, top_k=4)
    with pytest.raises(ValueError, match=r"max_length: cache 40, now 32"):
        write(out, max_length=32)
    with pytest.raises(ValueError, match=r"number of examples: cache 11, now 10.*examples \(their digest\)"):
        write(out, examples=EXAMPLES[:10])
    with pytest.raises(ValueError, match=r"student tokenizer fingerprint \('.*mistral' vs '.*gpt2'\): cache '522b"):
        write(out, student=gpt2)
    assert _shard_hashes(out) == _shard_hashes(cache_dir)  # untouched
    write(out, examples=EXAMPLES[:2], top_k=4, overwrite=True)
    cache = TeacherCache(out)
    assert cache.top_k == 4 and len(cache) == 2 and sorted(os.listdir(out)).count("shard-00001.safetensors") == 0
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not a teacher cache and holds other files \(todo\.txt\).*never"):
            write(foreign, overwrite=overwrite)
    assert os.listdir(foreign) == ["todo.txt"]


def test_a_second_writer_is_refused(cache_dir, write, tmp_path):
    from filelock import FileLock

    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    with FileLock(str(out / ".cache-teacher.lock")), pytest.raises(ValueError, match="another process is writing"):
        write(out)


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def model_dir(teacher, qwen, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    qwen.hf.save_pretrained(folder)
    return folder


def _cli(argv, capsys):
    from xtok_kd.cli.main import main

    code = main(["cache-teacher", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_readable_cache_and_refuses_other_settings(model_dir, tmp_path, capsys, teacher, qwen, mistral):
    data = tmp_path / "data.jsonl"
    rows = [json.dumps(e) for e in EXAMPLES[:5]] + ["{not json", json.dumps({"foo": 1}), json.dumps({"text": ""}),
                                                    json.dumps(CHAT)]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "cache"
    argv = ["--teacher", model_dir, "--student", "mistral", "--data", data, "-o", out, "--top-k", 4, "--max-length",
            48, "--batch-size", 4, "--shard-size", 3, "--dtype", "float32", "--device", "cpu", "--no-progress"]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    assert "examples: 6 (skipped: " in stdout and "1 bad_json" in stdout and "1 empty_text" in stdout
    assert "2 shards" in stdout and "top-4" in stdout
    cache = TeacherCache(out, teacher=qwen, student=mistral)
    assert len(cache) == 6 and cache.top_k == 4 and cache.manifest["teacher_name"] == str(model_dir)
    assert cache.teacher_tokenizer.fingerprint == qwen.fingerprint
    row = cache[5]
    assert row["messages"] == CHAT["messages"]
    batch = CrossTokenizerCollator(cache.teacher_tokenizer, mistral, max_length=48)([row])
    with torch.no_grad():
        logits = teacher(input_ids=batch["teacher_input_ids"]).logits
    ids, lps = teacher_topk(logits, 4, qwen.vocab_size)
    assert np.array_equal(row["teacher_topk_ids"], ids[0].numpy())
    assert np.allclose(row["teacher_topk_logprobs"], lps[0].numpy(), atol=1e-5)
    code, _, err = _cli([*argv[:-1], "--top-k", 5], capsys)
    assert code == 2 and "top_k: cache 4, now 5" in err and "--overwrite" in err
    _set_version(out, 1)
    code, _, err = _cli(argv, capsys)
    assert code == 2 and "format version 1; this xtok_kd reads version 2" in err
    assert f"xtok-kd cache-teacher ... -o {out} --overwrite" in err


def test_cli_reports_every_bad_option_and_writes_nothing(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    code, _, err = _cli(["--teacher", tmp_path / "nope", "--student", "./no-such-tok", "--data", tmp_path / "d.csv",
                         "-o", foreign, "--top-k", 0, "--batch-size", 0, "--loss-on", "some", "--dtype", "int8",
                         "--device", "cuda:x"], capsys)
    assert code == 2 and "problems with the command line" in err
    for part in ("--teacher", "no such file", "student tokenizer './no-such-tok'", "--data", "holds other files (a.txt)",
                 "--top-k 0", "--batch-size 0", "--loss-on 'some'", "--dtype 'int8'", "--device 'cuda:x'"):
        assert part in err, part
    assert os.listdir(foreign) == ["a.txt"] and sorted(os.listdir(tmp_path)) == ["foreign"]
    data = tmp_path / "bad.jsonl"
    data.write_text('{"foo": 1}\n{"text": ""}\n')
    code, _, err = _cli(["--teacher", "smollm2x", "--student", "mistral", "--data", data, "-o", tmp_path / "o"],
                        capsys)
    assert code == 2 and "--data" in err and "empty_text" in err and not (tmp_path / "o").exists()


def test_cli_reads_txt_data_in_passages(model_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    code, stdout, err = _cli(["--teacher", model_dir, "--student", "gpt2", "--data", SAMPLE_TEXT, "-o", out,
                              "--chars-per-example", 3000, "--max-length", 16, "--top-k", 2, "--device", "cpu",
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "examples: " in stdout and "skipped" not in stdout
    cache = TeacherCache(out, verify=False)
    assert len(cache) >= 4 and all(len(cache[i]["text"]) <= 3000 for i in range(len(cache)))
    assert cache[0]["teacher_topk_ids"].shape == (16, 2)


def test_cli_out_of_memory_names_the_flags_that_lower_memory():
    import argparse

    from xtok_kd.cli.cache_teacher import _memory_error

    args = argparse.Namespace(teacher="big", batch_size=8, dtype="auto", max_length=None)
    err = _memory_error(args, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"))
    assert all(flag in str(err) for flag in ("--batch-size", "--dtype bfloat16", "--max-length", "shards are kept"))
    other = RuntimeError("shapes do not match")
    assert _memory_error(args, other) is other
