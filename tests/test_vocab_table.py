"""Saving and loading tables: bit-identical round trip, fingerprint refusal, damaged files fail clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from conftest import tokenizer_path


@pytest.fixture(scope="module")
def views():
    from xtok_kd.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path("gpt2")), load_tokenizer(tokenizer_path("mistral"))


@pytest.fixture(scope="module")
def table(views):
    from xtok_kd.vocab import VocabAlignment

    return VocabAlignment.build(*views, neighbours=3, progress=False)


@pytest.fixture()
def saved(table, tmp_path):
    return table.save(tmp_path / "t.safetensors")


def test_round_trip_is_bit_identical(table, saved, views, tmp_path):
    from xtok_kd.vocab import VocabAlignment
    from xtok_kd.vocab.table import TENSORS

    loaded = VocabAlignment.load(saved, *views)
    for name in TENSORS:
        a, b = getattr(table, name), getattr(loaded, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert loaded.metadata == table.metadata
    assert json.dumps(loaded.metadata, sort_keys=True) == json.dumps(table.metadata, sort_keys=True)
    again = loaded.save(tmp_path / "again.safetensors")
    assert open(again, "rb").read() == open(saved, "rb").read()


def test_metadata_describes_the_table(table, views):
    meta = table.metadata
    assert meta["format_version"] == 2 and meta["library_version"]
    assert meta["teacher"]["fingerprint"] == views[0].fingerprint == table.teacher_fingerprint
    assert meta["student"]["vocab_size"] == views[1].vocab_size == table.student_vocab_size
    assert meta["parameters"]["neighbours"] == 3 and "VocabAlignment.build" in meta["command"]
    assert table.stats["exact_pairs"] == table.exact_teacher.shape[0]
    assert table.t2s_neighbours.shape == (views[0].vocab_size, 3)


def test_default_keeps_eight_neighbours_best_first(views):
    from xtok_kd.vocab import VocabAlignment

    table = VocabAlignment.build(*views, progress=False)
    assert table.metadata["parameters"]["neighbours"] == 8
    for d in ("t2s", "s2t"):
        ids, scores = getattr(table, f"{d}_neighbours"), getattr(table, f"{d}_neighbour_scores")
        assert ids.shape[1] == 8 and bool((scores[:, :-1] >= scores[:, 1:]).all())
        assert bool(((ids >= 0) == (scores > 0)).all())


def test_token_lengths_are_canonical_bytes_and_zero_for_specials(table, views):
    for view, lengths in zip(views, (table.teacher_token_lengths, table.student_token_lengths)):
        assert lengths.dtype == torch.int64 and lengths.shape == (view.vocab_size,)
        expected = [0 if i in view.special_ids else len(b) for i, b in enumerate(view.all_token_bytes())]
        assert lengths.tolist() == expected


def test_file_stores_compact_arrays(saved):
    from safetensors.numpy import load_file
    import numpy as np

    arrays = load_file(saved)
    assert arrays["teacher_token_lengths"].dtype == np.uint16 == arrays["student_token_lengths"].dtype
    assert arrays["t2s_neighbour_scores"].dtype == np.float16 == arrays["s2t_neighbour_scores"].dtype


def test_half_up_never_lowers_a_score():
    import numpy as np

    from xtok_kd.vocab.table import half_up

    exact = np.asarray([1 - d / n for n in range(1, 120) for d in range(n + 1)], dtype=np.float64)
    up = half_up(exact.astype(np.float32))
    assert up.dtype == np.float32 and np.array_equal(up.astype(np.float16).astype(np.float32), up)
    assert bool((up >= exact.astype(np.float32)).all()) and float((up - exact).max()) < 2.0 ** -11
    assert np.array_equal(half_up(up), up)  # idempotent: a saved table saves again unchanged
    assert float(half_up(np.float32([0.9]))[0]) >= np.float32(0.9)  # a token exactly at 0.9 passes 0.9


def write_v1_table(table, path):
    """Write ``table`` the way xtok_kd format version 1 did: no token lengths, float32 neighbour scores."""
    from safetensors.numpy import save_file
    import numpy as np

    from xtok_kd.vocab.table import _checksum, _to_file_arrays

    arrays = _to_file_arrays(table)
    del arrays["teacher_token_lengths"], arrays["student_token_lengths"]
    for d in ("t2s", "s2t"):
        arrays[f"{d}_neighbour_scores"] = arrays[f"{d}_neighbour_scores"].astype(np.float32)
    meta = json.dumps(dict(table.metadata, format_version=1), sort_keys=True)
    save_file(arrays, str(path), metadata={"xtok_kd": json.dumps({"checksum": _checksum(meta, arrays),
                                                                  "table": meta})})
    return str(path)


def test_refuses_other_tokenizer(saved, views):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment

    qwen = load_tokenizer(tokenizer_path("qwen2.5"))
    with pytest.raises(ValueError) as err:
        VocabAlignment.load(saved, teacher=views[0], student=qwen)
    msg = str(err.value)
    assert views[1].fingerprint in msg and qwen.fingerprint in msg
    assert "mistral" in msg and "qwen2.5" in msg


def test_to_moves_every_tensor(saved):
    from xtok_kd.vocab import VocabAlignment
    from xtok_kd.vocab.table import TENSORS

    table = VocabAlignment.load(saved)
    moved = table.to("meta")
    assert moved is table and table.device.type == "meta"
    assert all(getattr(table, name).device.type == "meta" for name in TENSORS)


def test_missing_file(tmp_path):
    from xtok_kd.vocab import VocabAlignment

    with pytest.raises(FileNotFoundError, match="xtok-kd align"):
        VocabAlignment.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, -10])
def test_truncated_file(saved, keep):
    from xtok_kd.vocab import VocabAlignment

    blob = open(saved, "rb").read()
    cut = int(len(blob) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(blob) + keep)
    with open(saved, "wb") as f:
        f.write(blob[:cut])
    with pytest.raises(ValueError, match="not a valid xtok_kd vocabulary table") as err:
        VocabAlignment.load(saved)
    assert "truncated" in str(err.value) or "cannot be read" in str(err.value)


def test_altered_data_fails_checksum(saved):
    from xtok_kd.vocab import VocabAlignment

    blob = bytearray(open(saved, "rb").read())
    blob[-7] ^= 0x01
    with open(saved, "wb") as f:
        f.write(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        VocabAlignment.load(saved)


def _rewrite_header(path, edit):
    """Apply ``edit`` to the table's metadata dict inside the file, keeping the stored checksum."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    wrapper = json.loads(header["__metadata__"]["xtok_kd"])
    meta = json.loads(wrapper["table"])
    edit(meta)
    wrapper["table"] = json.dumps(meta, sort_keys=True)
    header["__metadata__"]["xtok_kd"] = json.dumps(wrapper)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob[8 + n :])


def test_other_format_version_is_named(saved):
    from xtok_kd.vocab import VocabAlignment

    def edit(meta):
        meta["format_version"] = 99

    _rewrite_header(saved, edit)
    with pytest.raises(ValueError, match="format version 99"):
        VocabAlignment.load(saved)


def test_version_1_file_is_refused_with_the_rebuild_command(table, tmp_path):
    from xtok_kd.vocab import FORMAT_VERSION, VocabAlignment

    assert FORMAT_VERSION == 2
    path = write_v1_table(table, tmp_path / "old table.safetensors")
    with pytest.raises(ValueError) as err:
        VocabAlignment.load(path)
    msg = str(err.value)
    assert "format version 1" in msg and "reads format version 2" in msg and path in msg
    teacher, student = table.metadata["teacher"]["name"], table.metadata["student"]["name"]
    assert f"`xtok-kd align {teacher} {student} -o '{path}' --force`" in msg


def test_altered_metadata_fails_checksum(saved):
    from xtok_kd.vocab import VocabAlignment

    def edit(meta):
        meta["teacher"]["fingerprint"] = "0" * 16

    _rewrite_header(saved, edit)
    with pytest.raises(ValueError, match="checksum"):
        VocabAlignment.load(saved)


def test_wrong_shape_is_named(saved):
    from xtok_kd.vocab import VocabAlignment

    def edit(meta):
        meta["teacher"]["vocab_size"] += 1

    _rewrite_header(saved, edit)
    with pytest.raises(ValueError, match="t2s_lengths"):
        VocabAlignment.load(saved)


def test_not_a_table(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    from xtok_kd.vocab import VocabAlignment

    path = str(tmp_path / "other.safetensors")
    save_file({"x": np.zeros(3, dtype=np.float32)}, path)
    with pytest.raises(ValueError, match="cannot be read"):
        VocabAlignment.load(path)


def test_bad_build_arguments(views):
    from xtok_kd.vocab import VocabAlignment

    with pytest.raises(ValueError, match="neighbours must be an int >= 0"):
        VocabAlignment.build(*views, neighbours=-1, progress=False)


def test_any_flipped_byte_fails_with_value_error(saved):
    from xtok_kd.vocab import VocabAlignment

    blob = open(saved, "rb").read()
    positions = sorted(set(list(range(0, 64, 3)) + list(range(64, len(blob), max(1, len(blob) // 40)))))
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x5A
        with open(saved, "wb") as f:
            f.write(bytes(damaged))
        with pytest.raises(ValueError, match="not a valid xtok_kd vocabulary table"):
            VocabAlignment.load(saved)


# ---------------------------------------------------------------------- saving never loses another file
def _model_weights(path):
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"lm_head.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path),
              metadata={"format": "pt"})
    return open(path, "rb").read()


def test_save_refuses_an_existing_table_unless_overwrite(table, saved, tmp_path):
    from xtok_kd.vocab import VocabAlignment

    before = open(saved, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        table.save(saved)
    assert saved in str(err.value)
    assert open(saved, "rb").read() == before
    other = VocabAlignment.load(saved)
    other.metadata = dict(other.metadata, command="changed")
    assert other.save(saved, overwrite=True) == saved
    assert VocabAlignment.load(saved).metadata["command"] == "changed"
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left


@pytest.mark.parametrize("kind", ["model weights", "text", "empty", "other xtok_kd key", "folder"])
def test_save_never_replaces_what_is_not_a_table(table, tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "model weights":
        before = _model_weights(path)
    elif kind == "other xtok_kd key":
        from safetensors.numpy import save_file
        import numpy as np

        save_file({"w": np.zeros(2, dtype=np.float32)}, str(path), metadata={"xtok_kd": json.dumps({"x": 1})})
        before = open(path, "rb").read()
    elif kind == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("data")
        before = None
    else:
        before = b"" if kind == "empty" else b"my notes, not a table\n" * 100
        path.write_bytes(before)
    expected = IsADirectoryError if kind == "folder" else FileExistsError
    for overwrite in (False, True):
        with pytest.raises(expected) as err:
            table.save(path, overwrite=overwrite)
        assert str(path) in str(err.value)
        if overwrite and kind != "folder":
            assert "not an xtok_kd vocabulary table" in str(err.value) and "never replaced" in str(err.value)
    if before is None:
        assert (path / "keep.txt").read_text() == "data"
    else:
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_save_creates_a_missing_folder_and_refuses_a_file_as_folder(table, tmp_path):
    from xtok_kd.vocab import VocabAlignment

    path = table.save(tmp_path / "a" / "b" / "t.safetensors")
    assert VocabAlignment.load(path).metadata == table.metadata
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        table.save(tmp_path / "file" / "t.safetensors")
    assert (tmp_path / "file").read_text() == "x"


def test_table_file_problem_reads_the_marker(saved, tmp_path):
    from xtok_kd.vocab.table import table_file_problem

    assert table_file_problem(saved) is None
    weights = tmp_path / "w.safetensors"
    _model_weights(weights)
    assert "no xtok_kd table marker" in table_file_problem(weights)
    assert "not a regular file" in table_file_problem(tmp_path)
    assert "not an xtok_kd vocabulary table" in table_file_problem(tmp_path)
    assert "cannot be examined" in table_file_problem(tmp_path / "missing")
    (tmp_path / "huge").write_bytes(b"\xff" * 8 + b"{}")  # header length far beyond the file
    assert "not a safetensors file" in table_file_problem(tmp_path / "huge")
