"""TokenizerView on hostile inputs and unusual tokenizers: special tokens written in the text (also when they are
the unk token), added tokens matched on normalised text, empty and content-free texts, load and input errors
that name the bad value and the fix, and texts holding many special tokens (linear cost).

Every tokenizer here is real (the embedded Qwen2.5, Mistral and GPT-2, Llama 3.2) or built in the test from a
real one with the ``tokenizers`` library; nothing touches the network.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from xtok_kd import align_spans
from xtok_kd.assets import EMBEDDED_TOKENIZERS, embedded_tokenizer
from xtok_kd.tokenizer import TokenizerView, load_tokenizer

GEMMA_LIKE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}  # SentencePiece, no Prepend


# ---------------------------------------------------------------- helpers
def built(base: str, *, normalizer: dict | None = None, added: tuple = (), special: tuple = (),
          **special_names: str) -> TokenizerView:
    """A view of embedded tokenizer ``base`` with extra tokens: ``added`` holds ``(content, normalized)`` pairs
    of non-special tokens, ``special`` holds special tokens matched on the raw text."""
    config = json.loads((embedded_tokenizer(base) / "tokenizer.json").read_text(encoding="utf-8"))
    if normalizer is not None:
        config["normalizer"] = normalizer
    tok = Tokenizer.from_str(json.dumps(config))
    tok.add_tokens([AddedToken(content, normalized=normalized, special=False) for content, normalized in added])
    tok.add_special_tokens([AddedToken(content, normalized=False, special=True) for content in special])
    return load_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, **special_names))


def sentencepiece(**kw) -> TokenizerView:
    return built("mistral", unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kw)


def byte_level(**kw) -> TokenizerView:
    return built("gpt2", unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>", **kw)


@pytest.fixture(scope="module")
def wordpiece() -> TokenizerView:
    """A BERT-style tokenizer: lowercasing normaliser that deletes control characters, a pre-tokenizer that
    drops whitespace, [CLS]/[SEP] added by the post-processor and a WordPiece model that emits genuine [UNK]."""
    from tokenizers import models, normalizers, pre_tokenizers, processors

    words = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "the", "cafe", "a", "b"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.add_special_tokens([AddedToken(w, special=True) for w in ("[UNK]", "[CLS]", "[SEP]")])
    return load_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                                  sep_token="[SEP]"))


def assert_well_formed(view: TokenizerView, text: str, enc) -> None:
    """Spans are inside the text and monotone, non-empty ones disjoint; the fast path, when it answers, agrees."""
    spans = enc.spans
    assert enc.num_bytes == len(text.encode("utf-8"))
    assert spans.shape == (len(enc), 2) and (spans[:, 0] <= spans[:, 1]).all()
    assert (spans >= 0).all() and (spans <= enc.num_bytes).all()
    assert (np.diff(spans[:, 0]) >= 0).all() and (np.diff(spans[:, 1]) >= 0).all()
    solid = spans[spans[:, 1] > spans[:, 0]]
    assert (solid[1:, 0] >= solid[:-1, 1]).all()
    assert enc.uncovered_bytes == enc.num_bytes - int((spans[:, 1] - spans[:, 0]).sum())
    fast = view._fast_spans(text, enc.ids)
    assert fast is None or np.array_equal(fast, spans)


def assert_spans_spell_tokens(view: TokenizerView, text: str, enc) -> None:
    """Every token with a non-empty span covers exactly its canonical bytes, and the spans tile the text."""
    data = text.encode("utf-8")
    wrong = [(int(i), view.token_bytes(int(i)), data[a:b]) for i, (a, b) in zip(enc.ids, enc.spans.tolist())
             if b > a and data[a:b] != view.token_bytes(int(i))]
    assert not wrong, f"{text!r}: (id, token_bytes, span bytes) {wrong[:5]}"
    solid = enc.spans[enc.spans[:, 1] > enc.spans[:, 0]]
    assert solid[0, 0] == 0 and solid[-1, 1] == len(data) and (solid[1:, 0] == solid[:-1, 1]).all()
    assert enc.uncovered_bytes == 0


def overlaps(spans: np.ndarray, lo: int, hi: int) -> bool:
    return bool(((spans[:, 0] < hi) & (spans[:, 1] > lo) & (spans[:, 1] > spans[:, 0])).any())


# ---------------------------------------------------------------- 6. special tokens that are also <unk>
@pytest.mark.parametrize("name, marker", [("gpt2", "<|endoftext|>"), ("mistral", "<unk>"), ("mistral", "<s>"),
                                          ("qwen", "<|im_end|>"), ("llama", "<|begin_of_text|>")])
def test_special_token_in_text_is_a_control_token_even_when_it_is_unk(request, name, marker):
    view = request.getfixturevalue(name)
    text = f"hi {marker} there"
    lo, hi = 3, 3 + len(marker)
    enc = view.encode(text)
    assert_well_formed(view, text, enc)
    marker_id = view.backend.token_to_id(marker)
    pos = np.flatnonzero(enc.ids == marker_id)
    pos = pos[~np.asarray(view.backend.encode(text).special_tokens_mask, dtype=bool)[pos]]  # not the BOS
    assert pos.shape[0] == 1 and enc.spans[pos[0], 0] == enc.spans[pos[0], 1]
    assert enc.special_in_text == 1 and enc.unknown_tokens == 0
    assert enc.uncovered_bytes == len(marker) and not overlaps(enc.spans, lo, hi)
    # The other side spells the marker as ordinary tokens: those bytes are never paired with anything.
    other = request.getfixturevalue("llama" if name == "gpt2" else "gpt2").encode(text)
    assert not other.special_in_text and overlaps(other.spans, lo, hi)
    al = align_spans(enc.spans, other.spans)
    assert al.num_chunks > 0 and not overlaps(al.chunk_bytes, lo, hi)


def test_unk_written_in_text_vs_unk_the_model_emits(wordpiece):
    """Genuine unknowns keep their span (they stand for text); the literal token is a control token."""
    enc = wordpiece.encode("hello zzz world")
    unk = wordpiece.unk_id
    assert enc.ids.tolist() == [1, 3, unk, 4, 2] and enc.spans[2].tolist() == [6, 9]
    assert enc.unknown_tokens == 1 and enc.special_in_text == 0
    enc = wordpiece.encode("zzz [UNK] qqq")
    assert enc.ids.tolist() == [1, unk, unk, unk, 2]
    assert enc.spans[1:4].tolist() == [[0, 3], [10, 10], [10, 13]]
    assert enc.unknown_tokens == 2 and enc.special_in_text == 1 and enc.uncovered_bytes == 7
    assert_well_formed(wordpiece, "zzz [UNK] qqq", enc)


def test_fast_path_never_gives_a_special_token_a_span():
    """A one-byte special token in a SentencePiece tokenizer that prepends "▁": the missing byte and the extra
    prefix space cancel out, so the old length check alone let the text through with shifted spans."""
    view = sentencepiece(special=("|",))
    bar = view.backend.token_to_id("|")
    for text in ("a|b", "x | y", "|lead", "trail|", "a||b"):
        enc = view.encode(text)
        assert view._fast_spans(text, enc.ids) is None
        assert_well_formed(view, text, enc)
        assert (enc.spans[enc.ids == bar, 0] == enc.spans[enc.ids == bar, 1]).all()
        assert enc.special_in_text == text.count("|") and enc.uncovered_bytes == text.count("|")
        for k in (i for i, c in enumerate(text) if c == "|"):
            assert not overlaps(enc.spans, k, k + 1)
    assert view.encode("a|b").spans.tolist() == [[0, 0], [0, 1], [2, 2], [2, 3]]


def test_fast_path_declines_special_ids_beyond_the_post_processor(qwen, mistral, gpt2, llama):
    for view in (qwen, mistral, gpt2, llama):
        plain = "Hello world, fine text."
        ids = view.encode(plain).ids
        assert view._fast_spans(plain, ids) is not None  # the benchmarked fast path still answers
        for marker in ("<|endoftext|>", "<unk>", "<s>", "</s>", "<|im_end|>", "<|begin_of_text|>"):
            tid = view.backend.token_to_id(marker)
            if tid is None or tid not in view.special_ids:
                continue
            text = f"Hello {marker} world"
            assert view._fast_spans(text, np.array(view.backend.encode(text).ids)) is None, (view, marker)


# ---------------------------------------------------------------- 10. added tokens matched on normalised text
WHITESPACE_TEXTS = ["a  b    c", "x" + " " * 30 + "y", "    lead", "trail     ", "code:\n        return  x",
                    "a <tag>  b", " " * 50, "def f():\n\treturn 1\n\n\n    pass"]


def test_sentencepiece_added_whitespace_tokens_have_space_bytes():
    """Added "▁▁"-style tokens with normalized=True (two of them also model pieces, one new id) are spelled with
    spaces like model pieces; a raw-matched "<tag>" keeps its text. Spans then spell every token exactly."""
    runs = ("\u2581" * 2, "\u2581" * 4, "\u2581" * 24)
    view = sentencepiece(normalizer=GEMMA_LIKE, added=tuple((r, True) for r in runs) + (("<tag>", False),))
    for run in runs:
        assert view.token_bytes(view.backend.token_to_id(run)) == b" " * len(run)
    assert view.token_bytes(view.backend.token_to_id("<tag>")) == b"<tag>"
    seen: set[int] = set()
    for text in WHITESPACE_TEXTS:
        enc = view.encode(text)
        assert_well_formed(view, text, enc)
        assert_spans_spell_tokens(view, text, enc)
        seen.update(int(i) for i in enc.ids if int(i) in view._added_tokens and int(i) not in view.special_ids)
    assert {view.backend.token_to_id(r) for r in runs} | {view.backend.token_to_id("<tag>")} <= seen


def test_added_whitespace_tokens_on_mistral_itself():
    """The same tokens on Mistral's own normaliser (Prepend + Replace): same bytes, spans still well formed."""
    view = sentencepiece(added=(("\u2581\u2581", True), ("\u2581" * 4, True), ("\u2581" * 24, True)))
    assert [view.token_bytes(view.backend.token_to_id("\u2581" * k)) for k in (2, 4, 24)] == [
        b"  ", b"    ", b" " * 24]
    assert view.token_bytes(259) == view.token_bytes(view.backend.token_to_id("\u2581\u2581"))
    for text in WHITESPACE_TEXTS:
        enc = view.encode(text)
        assert_well_formed(view, text, enc)
        assert enc.uncovered_bytes == 0


def test_byte_level_added_tokens_keep_their_text(gpt2):
    """GPT-2 with added non-special tokens: whitespace runs (normalized=True), a tag, and a token spelled in the
    byte alphabet but matched on the raw text (its bytes are its raw UTF-8, since that is what it matches)."""
    contents = [("  ", True), ("\t\t", True), ("<tag>", False), ("\u0120\u0120\u0120", False)]
    view = byte_level(added=tuple(contents))
    assert [view.token_bytes(view.backend.token_to_id(c)) for c, _ in contents] == [
        b"  ", b"\t\t", b"<tag>", "\u0120\u0120\u0120".encode("utf-8")]
    assert view.token_bytes(gpt2.backend.token_to_id("\u0120the")) == b" the"  # model pieces unchanged
    seen: set[int] = set()
    for text in WHITESPACE_TEXTS + ["\t\t\tx", "lit \u0120\u0120\u0120 eral"]:
        enc = view.encode(text)
        assert_well_formed(view, text, enc)
        assert_spans_spell_tokens(view, text, enc)
        assert view._fast_spans(text, enc.ids) is not None  # byte-exact: the fast path takes added tokens
        seen.update(int(i) for i in enc.ids if int(i) >= gpt2.vocab_size)
    assert seen == {view.backend.token_to_id(c) for c, _ in contents}


def test_embedded_token_bytes_unchanged_by_added_token_rules(qwen, mistral, gpt2):
    assert qwen.token_bytes(qwen.backend.token_to_id("<tool_call>")) == b"<tool_call>"
    assert mistral.token_bytes(0) == b"<unk>" and mistral.token_bytes(259) == b"  "
    assert gpt2.token_bytes(50256) == b"<|endoftext|>"
    text = "Plain text, with  two spaces\tand\ttabs.\n"
    for view in (qwen, gpt2):
        assert_spans_spell_tokens(view, text, view.encode(text))
    assert_well_formed(mistral, text, mistral.encode(text))  # its first token holds the prefix space


# ---------------------------------------------------------------- 16. empty and content-free texts
def test_empty_text_gives_only_the_added_tokens(qwen, mistral, gpt2, llama):
    expected = {"qwen": [], "mistral": [1], "gpt2": [], "llama": [128000]}
    encs = {}
    for name, view in (("qwen", qwen), ("mistral", mistral), ("gpt2", gpt2), ("llama", llama)):
        enc = view.encode("")
        assert enc.ids.tolist() == expected[name] and enc.num_bytes == 0 and enc.uncovered_bytes == 0
        assert enc.spans.shape == (len(expected[name]), 2) and not enc.spans.any()
        assert view.encode("", add_special_tokens=False).ids.tolist() == []
        batch = view.encode_batch(["", "Hi there", ""])
        assert [b.ids.tolist() for b in batch] == [expected[name], view.encode("Hi there").ids.tolist(),
                                                   expected[name]]
        assert np.array_equal(batch[1].spans, view.encode("Hi there").spans)
        encs[name] = enc
    for a in encs.values():
        for b in encs.values():
            al = align_spans(a.spans, b.spans)
            assert al.num_chunks == 0


def test_text_of_special_tokens_or_dropped_whitespace_only(qwen, llama, mistral, wordpiece):
    cases = [(qwen, "<|im_start|><|im_end|>", 2), (llama, "<|begin_of_text|>", 1), (mistral, "<s></s>", 2),
             (wordpiece, "   \n\t ", 0), (wordpiece, "[UNK]", 1)]
    for view, text, specials in cases:
        enc = view.encode(text)
        assert_well_formed(view, text, enc)
        assert (enc.spans[:, 0] == enc.spans[:, 1]).all()
        assert enc.special_in_text == specials and enc.uncovered_bytes == len(text.encode("utf-8"))
        al = align_spans(enc.spans, enc.spans)
        assert al.num_chunks == 0
    # Against a side that does spell the markers as text: still no chunk, the bytes are reported unaligned.
    al = align_spans(qwen.encode("<|im_start|><|im_end|>").spans, llama.encode("<|im_start|><|im_end|>").spans)
    assert al.num_chunks == 0


def test_deleted_and_dropped_bytes_are_not_absorbed(wordpiece):
    """A control character the normaliser deletes next to whitespace the pre-tokenizer drops stays uncovered."""
    text = "Hello  Worlds\x00 caf\u00e9"
    enc = wordpiece.encode(text)
    assert_well_formed(wordpiece, text, enc)
    assert enc.spans[1:5].tolist() == [[0, 5], [7, 12], [12, 13], [15, 20]]
    assert enc.uncovered_bytes == 4


# ---------------------------------------------------------------- 17. messages that name the value and the fix
OPTIONS = ["tokenizer.json", "Qwen/Qwen2.5-0.5B", "qwen2.5", "mistral", "gpt2"]


@pytest.fixture
def offline(monkeypatch):
    """No network: huggingface_hub reads HF_HUB_OFFLINE once at import, so patch the constant too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def load_error(value) -> str:
    with pytest.raises(ValueError) as info:
        load_tokenizer(value)
    return str(info.value)


def test_missing_folder_message(tmp_path):
    for value in ("/nonexistent/tok", str(tmp_path / "absent"), "./tok", "a/b/c", tmp_path / "absent"):
        msg = load_error(value)
        assert f"no such folder {str(value)!r}" in msg and "Repo id" not in msg
        assert all(o in msg for o in OPTIONS), msg


def test_folder_without_or_with_broken_tokenizer_json(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = load_error(str(empty))
    assert repr(str(empty)) in msg and "has no tokenizer.json" in msg and "it is empty" in msg
    assert "sentencepiece" not in msg and "save_pretrained" in msg and all(o in msg for o in OPTIONS)
    for content, says in (("{}", "is not a valid tokenizers JSON file"), ("nope{", "is not valid JSON"),
                          ('{"model": 3}', "is not a valid tokenizers JSON file")):
        folder = tmp_path / f"broken{len(content)}"
        folder.mkdir()
        (folder / "tokenizer.json").write_text(content)
        msg = load_error(str(folder))
        assert repr(str(folder / "tokenizer.json")) in msg and says in msg, msg
        assert "KeyError" not in msg and "save_pretrained" in msg and all(o in msg for o in OPTIONS)
    lone = tmp_path / "tok.json"
    lone.write_text("{}")
    msg = load_error(str(lone))
    assert repr(str(lone)) in msg and "is a file" in msg and all(o in msg for o in OPTIONS)


def test_tokenizer_json_path_and_embedded_names_load(tmp_path):
    source = embedded_tokenizer("gpt2") / "tokenizer.json"
    (tmp_path / "tokenizer.json").write_bytes(source.read_bytes())
    for value in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        assert load_tokenizer(value).encode("Hello").ids.tolist() == [15496]
    assert embedded_tokenizer("Qwen2.5") == embedded_tokenizer("qwen2.5") is not None
    assert embedded_tokenizer("llama3.2") is None and embedded_tokenizer(None) is None
    assert load_tokenizer("GPT2").vocab_size == 50257


def test_unknown_names_list_the_embedded_ones(offline):
    msg = load_error("bad name!")
    assert "'bad name!'" in msg and "valid hub id" in msg and all(o in msg for o in OPTIONS)
    for value, guess in (("qwen", "qwen2.5"), ("mistral7b", "mistral"), ("no-such-tokenizer", None)):
        msg = load_error(value)
        assert repr(value) in msg and "could not be downloaded or found" in msg and all(o in msg for o in OPTIONS)
        assert (f"did you mean {guess!r}" in msg) if guess else "did you mean" not in msg
    assert ", ".join(EMBEDDED_TOKENIZERS) in msg


def test_hub_id_goes_to_the_hub(offline, monkeypatch):
    msg = load_error("Qwen/Qwen2.5-0.5B")
    assert "'Qwen/Qwen2.5-0.5B'" in msg and "could not be downloaded or found" in msg
    assert "folder containing tokenizer.json" in msg and "qwen2.5, mistral, gpt2" in msg
    # A hub id that does load (stand-in for the download) gives a view named after the id.
    import transformers

    real = transformers.AutoTokenizer.from_pretrained
    asked = []

    def fake(name, **kwargs):
        asked.append((name, kwargs))
        return real(str(embedded_tokenizer("gpt2")))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    view = load_tokenizer("openai-community/gpt2", revision="main")
    assert asked == [("openai-community/gpt2", {"revision": "main"})] and view.name == "openai-community/gpt2"


def test_unpaired_surrogate_message(qwen, mistral):
    for view in (qwen, mistral):
        with pytest.raises(ValueError) as info:
            view.encode("a\ud800b")
        msg = str(info.value)
        assert "unpaired surrogate U+D800 at character index 1" in msg and "not valid Unicode" in msg
        assert "text.encode('utf-8', 'replace').decode()" in msg and "must be str" not in msg
        with pytest.raises(ValueError, match=r"text 2 holds an unpaired surrogate U\+DC00 at character index 3"):
            view.encode_batch(["fine", "", "abc\udc00"])
    fixed = "a\ud800b".encode("utf-8", "replace").decode()
    assert qwen.encode(fixed).num_bytes == 3


def test_wrong_input_types_name_the_value(qwen):
    with pytest.raises(TypeError, match=r"takes a str, got bytes: b'abc'.*decode"):
        qwen.encode(b"abc")
    with pytest.raises(TypeError, match=r"text 1 is a int \(7\), not a str"):
        qwen.encode_batch(["ok", 7])
    with pytest.raises(TypeError, match="got one str 'abc'.*use encode"):
        qwen.encode_batch("abc")


# ---------------------------------------------------------------- 20. many special tokens: linear cost
def python_lines(view: TokenizerView, text: str) -> int:
    """Python lines of xtok_kd/tokenizer.py that one encode() executes (numpy and the backend not counted):
    a per-gap or per-special-token loop makes this grow with the text."""
    import xtok_kd.tokenizer as module

    target, count = module.__file__, 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == target else None

    view.encode(text)  # warm the cached properties
    previous = sys.gettrace()  # a coverage tool's tracer, if any, comes back afterwards
    sys.settrace(tracer)
    try:
        view.encode(text)
    finally:
        sys.settrace(previous)
    return count


def test_many_special_tokens_cost_no_python_per_token(qwen, gpt2, mistral):
    for view, unit in ((qwen, "Hello world<|im_end|>"), (qwen, "<|im_start|>user\nHi<|im_end|>\n"),
                       (gpt2, "one <|endoftext|>"), (mistral, "a </s> b <unk>")):
        small, large = python_lines(view, unit * 25), python_lines(view, unit * 400)
        assert large <= small + 5, (view, unit, small, large)
    enc = qwen.encode("Hello world<|im_end|>" * 2000)
    assert enc.special_in_text == 2000 and enc.uncovered_bytes == 2000 * len("<|im_end|>")
    assert_well_formed(qwen, "Hello world<|im_end|>" * 2000, enc)
    assert enc.spans[2].tolist() == [21, 21] and enc.spans[3].tolist() == [21, 26]


def test_normaliser_gaps_next_to_special_tokens(qwen):
    """NFC folds e + U+0301: the combining mark goes to the token before it, also right before a special."""
    text = "cafe\u0301<|im_end|>e\u0301 x"
    enc = qwen.encode(text)
    assert_well_formed(qwen, text, enc)
    assert enc.special_in_text == 1 and enc.uncovered_bytes == len("<|im_end|>")
    data = text.encode("utf-8")
    covered = b"".join(data[a:b] for a, b in enc.spans.tolist())
    assert covered == data.replace(b"<|im_end|>", b"")


# ---------------------------------------------------------------- all of the above, mixed at random
FRAGMENTS = ["Hello", " world", "  ", "\n\n", "\t", "<|im_end|>", "<|endoftext|>", "<unk>", "<s>", "</s>",
             "<|begin_of_text|>", "e\u0301", "\u00e9", "\U0001F600", "\u65e5\u672c", " 42", "\x00", "\u200b",
             "<tool_call>", "\u2581", "\u0120"]


@pytest.mark.parametrize("name", ["qwen", "mistral", "gpt2", "llama"])
def test_random_hostile_texts(request, name):
    """Seeded random mixes of text, special tokens, unk literals, whitespace, combining marks and emoji: spans
    stay exact (byte-level tokenizers without a normaliser spell every covered byte with the token's bytes) and
    the uncovered bytes are exactly the special tokens written in the text."""
    view = request.getfixturevalue(name)
    rng = np.random.default_rng(20)
    specials = {f for f in FRAGMENTS if (t := view.backend.token_to_id(f)) is not None and t in view.special_ids}
    for _ in range(150):
        parts = [FRAGMENTS[k] for k in rng.integers(0, len(FRAGMENTS), size=int(rng.integers(0, 12)))]
        text = "".join(parts)
        enc = view.encode(text)
        assert_well_formed(view, text, enc)
        in_text = view.backend.encode(text, add_special_tokens=False).tokens
        assert enc.special_in_text == sum(tok in specials for tok in in_text)
        if name in ("gpt2", "llama"):
            data = text.encode("utf-8")
            assert enc.uncovered_bytes == sum(len(tok.encode("utf-8")) for tok in in_text if tok in specials)
            for tid, (a, b) in zip(enc.ids.tolist(), enc.spans.tolist()):
                assert a == b or data[a:b] == view.token_bytes(tid), (text, tid)
