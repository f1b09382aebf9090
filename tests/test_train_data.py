"""Training data pipeline: sources, tokenization modes, chat loss masks, packing, shuffling,
resumable iterator state, held-out split and input errors (`v4jax/train/data.py`,
`v4jax/train/packing.py`; V4 report §4.1)."""

import json

import grain
import numpy as np
import pytest

from v4jax.tokenizer import EOS, format_chat, load_tokenizer
from v4jax.train.data import (
    BYTE_OFFSET,
    ByteTokenizer,
    DataConfig,
    DataError,
    TokenizerMode,
    build_datasets,
    encode_chat_document,
    encode_document,
    encode_text_document,
    load_corpus,
    tokenizer_mode,
)
from v4jax.train.packing import Document, PackedBatches, held_out_split

TINY_VOCAB = 1024  # the tiny presets' vocabulary: byte mode

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "reasoning_content": "Add them.", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "reasoning_content": "Add again.", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _synthetic_docs(lengths):
    """Document k holds tokens 1000*k + 0 .. 1000*k + n-1 (its identity and order are readable
    off each token) and a mask with some zeros inside (as in chat documents)."""
    docs = []
    for k, n in enumerate(lengths):
        mask = (np.arange(n) % 3 != 1).astype(np.int32)
        mask[0] = 0
        docs.append(Document(np.arange(n, dtype=np.int32) + 1000 * (k + 1), mask))
    return docs


def _batches(ds, state=None):
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return list(it)


def _segments(batches):
    """(tokens, mask) of each row fragment, in stream order."""
    out = []
    for b in batches:
        for r in range(b.tokens.shape[0]):
            for s in range(1, b.segment_ids[r].max() + 1):
                sel = b.segment_ids[r] == s
                out.append((b.tokens[r, sel], b.mask[r, sel], b.positions[r, sel]))
    return out


# ------------------------------------------------------------------------------------------
# packing


def test_packing_hand_example():
    # lengths 3, 7, 2 into rows of S=5: [d0 d0 d0 d1 d1] [d1 d1 d1 d1 d1] [d2 d2 pad pad pad]
    docs = _synthetic_docs([3, 7, 2])
    (b0, b1) = _batches(PackedBatches(grain.MapDataset.source(docs), seq_len=5, batch_size=2))
    np.testing.assert_array_equal(
        b0.tokens, [[1000, 1001, 1002, 2000, 2001], [2002, 2003, 2004, 2005, 2006]]
    )
    np.testing.assert_array_equal(b0.segment_ids, [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b0.positions, [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    # source masks are 0 1 1 | 0 0 1 1 0 1 1 (k % 3 != 1 except the first token); the
    # continuation d1[2:] starts a row, so its first token (a target in d1) is dropped there
    np.testing.assert_array_equal(b0.mask, [[0, 0, 1, 0, 0], [0, 1, 0, 1, 1]])
    np.testing.assert_array_equal(b1.tokens, [[3000, 3001, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b1.segment_ids, [[1, 1, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b1.mask, [[0, 0, 0, 0, 0], [0] * 5])
    assert b0.tokens.dtype == np.int32 and b0.mask.dtype == np.int32


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_packing_keeps_every_token_once_in_order(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(1, 40, size=25)
    docs = _synthetic_docs(lengths)
    batches = _batches(PackedBatches(grain.MapDataset.source(docs), seq_len=seq_len, batch_size=3))
    assert all(b.tokens.shape == (3, seq_len) for b in batches)
    stream = np.concatenate([t for t, _, _ in _segments(batches)])
    np.testing.assert_array_equal(stream, np.concatenate([d.tokens for d in docs]))
    # only the very end is padded
    n = sum(lengths)
    flat = np.concatenate([b.segment_ids.reshape(-1) for b in batches])
    assert (flat[:n] > 0).all() and (flat[n:] == 0).all() and len(flat) - n < 3 * seq_len


@pytest.mark.parametrize("seq_len", [7, 16])
def test_mask_never_crosses_a_document_boundary(seq_len):
    docs = _synthetic_docs(np.random.default_rng(1).integers(1, 30, size=30))
    batches = _batches(PackedBatches(grain.MapDataset.source(docs), seq_len=seq_len, batch_size=2))
    for b in batches:
        assert (b.mask[:, 0] == 0).all()
        t, m, seg = b.tokens, b.mask, b.segment_ids
        tgt = m[:, 1:] == 1
        # a target's predecessor is the previous token of the same document, in the same segment
        assert (seg[:, 1:][tgt] == seg[:, :-1][tgt]).all() and (seg[:, 1:][tgt] > 0).all()
        assert (t[:, 1:][tgt] - t[:, :-1][tgt] == 1).all()
        assert (t[:, 1:][tgt] // 1000 == t[:, :-1][tgt] // 1000).all()
    # every source target survives except those that start a continuation fragment
    lost = 0
    for tokens, mask, pos in _segments(batches):
        doc = docs[tokens[0] // 1000 - 1]
        j = tokens - 1000 * (tokens[0] // 1000)
        np.testing.assert_array_equal(mask[1:], doc.mask[j[1:]])
        np.testing.assert_array_equal(pos, np.arange(len(tokens)))  # positions per fragment
        lost += int(doc.mask[j[0]])
    kept = sum(int(b.mask.sum()) for b in batches)
    assert kept + lost == sum(int(d.mask.sum()) for d in docs)


# ------------------------------------------------------------------------------------------
# tokenization and documents


def test_tokenizer_mode():
    assert tokenizer_mode(TINY_VOCAB) is TokenizerMode.BYTES
    assert tokenizer_mode(129280) is TokenizerMode.OFFICIAL
    with pytest.raises(ValueError, match="vocab_size=100"):
        tokenizer_mode(100)


def test_byte_mode_text_document():
    bt = ByteTokenizer()
    doc = encode_text_document("hé!", bt)
    # UTF-8 of "hé!" is 68 c3 a9 21; ids are bytes + 2 between BOS 0 and EOS 1
    np.testing.assert_array_equal(doc.tokens, [0, 0x68 + 2, 0xC3 + 2, 0xA9 + 2, 0x21 + 2, 1])
    np.testing.assert_array_equal(doc.mask, [0, 1, 1, 1, 1, 1])
    assert BYTE_OFFSET == 2 and doc.tokens.max() < TINY_VOCAB
    assert bt.decode(doc.tokens[1:-1]) == "hé!"


def test_official_text_document(tok):
    doc = encode_text_document("Hello world", tok)
    np.testing.assert_array_equal(doc.tokens, [0, *tok.encode("Hello world"), 1])
    assert doc.mask[0] == 0 and doc.mask[1:].all()


def _runs(mask):
    """[start, end) of each run of ones."""
    d = np.diff(np.r_[0, mask, 0])
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_mask_is_exactly_the_assistant_parts(tok, thinking):
    doc = encode_chat_document(CHAT, tok, thinking=thinking)
    full = format_chat(CHAT, thinking=thinking, add_generation_prompt=False)
    np.testing.assert_array_equal(doc.tokens, tok.encode(full))  # same ids as one encoding
    parts = [tok.decode(doc.tokens[a:b]) for a, b in _runs(doc.mask)]
    # the first turn is before the last user turn: rendered without reasoning in both modes;
    # the last turn keeps its reasoning (and its </think>) in thinking mode
    last = ("Add again.</think>" if thinking else "") + "6, of course." + EOS
    assert parts == ["4" + EOS, last]
    prompt_end = "<｜Assistant｜>" + ("<think>" if thinking else "</think>")
    a, _ = _runs(doc.mask)[-1]
    assert tok.decode(doc.tokens[:a]).endswith("<｜User｜>And 3+3?" + prompt_end)


TOOL_CHAT = [
    {
        "role": "system",
        "content": "You can look things up.",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Find a fact.",
                    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                },
            }
        ],
    },
    {"role": "user", "content": "Capital of France?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": "capital of France"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "Paris"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_mask_with_tool_calls(tok, thinking):
    """Tool-using conversations: the assistant's DSML tool call and its answer are targets; the
    tools section and the tool result (rendered in a user turn) are not."""
    doc = encode_chat_document(TOOL_CHAT, tok, thinking=thinking)
    full = format_chat(TOOL_CHAT, thinking=thinking, add_generation_prompt=False)
    np.testing.assert_array_equal(doc.tokens, tok.encode(full))
    parts = [tok.decode(doc.tokens[a:b]) for a, b in _runs(doc.mask)]
    assert len(parts) == 2 and parts[1].endswith("Paris." + EOS), parts
    assert "lookup" in parts[0] and "capital of France" in parts[0] and parts[0].endswith(EOS)
    prompt = tok.decode(doc.tokens[doc.mask == 0])
    assert "Find a fact." in prompt and "Paris" in prompt  # tools and the tool result


def test_chat_mask_byte_mode():
    bt = ByteTokenizer()
    doc = encode_chat_document(CHAT[1:3], bt)
    parts = [bt.decode(doc.tokens[a:b]) for a, b in _runs(doc.mask)]
    assert parts == ["4" + EOS]
    assert doc.tokens[0] == 0 and doc.tokens[-1] == 1 and doc.tokens.max() < TINY_VOCAB


# ------------------------------------------------------------------------------------------
# pipeline: shuffling, epochs, state, held-out split


def _corpus(tmp_path, n=24):
    """n text documents "doc NN ..." of varied length, one per jsonl line."""
    lines = [json.dumps({"text": f"doc {i:02d} " + "x" * (i % 7 * 5)}) for i in range(n)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "c.jsonl")


def _build(path, **kw):
    cfg = dict(paths=(path,), seq_len=32, batch_size=2, num_epochs=2) | kw
    return build_datasets(DataConfig(**cfg), vocab_size=TINY_VOCAB)


def _texts(batches):
    """The document texts of the stream, in order (segments joined across rows)."""
    bt = ByteTokenizer()
    stream = np.concatenate([t for t, _, _ in _segments(batches)])
    return [t for t in bt.decode(stream).split(EOS) if t]


def test_shuffle_deterministic_by_seed_and_epochs(tmp_path):
    path = _corpus(tmp_path)
    run = [_texts(_batches(_build(path, seed=s).train)) for s in (0, 0, 1)]
    assert run[0] == run[1]
    assert run[0] != run[2]
    texts = [json.loads(x)["text"] for x in open(path)]
    bos = "<｜begin▁of▁sentence｜>"
    epoch1, epoch2 = run[0][:24], run[0][24:]
    assert sorted(t.removeprefix(bos) for t in epoch1) == sorted(texts)  # each doc once
    assert sorted(t.removeprefix(bos) for t in epoch2) == sorted(texts)
    assert epoch1 != epoch2  # reshuffled each epoch
    unshuffled = _texts(_batches(_build(path, shuffle=False, num_epochs=1).train))
    assert [t.removeprefix(bos) for t in unshuffled] == texts


def test_state_restore_gives_identical_batches(tmp_path):
    ds = _build(_corpus(tmp_path), seq_len=24, batch_size=3).train
    it = iter(ds)
    states, batches = [], []
    while True:
        states.append(json.loads(json.dumps(it.get_state())))  # as saved with a checkpoint
        try:
            batches.append(next(it))
        except StopIteration:
            break
    # some saved points sit inside a document, and both epochs are crossed from early ones
    assert any(s["offset"] > 0 for s in states) and states[-1]["next_index"] == 48
    assert {0, 1} <= {s["next_index"] // 24 for s in states[::3]}  # saved in both epochs
    for k in range(0, len(batches), 3):
        rest = _batches(ds, states[k])
        assert len(rest) == len(batches) - k
        for a, b in zip(rest, batches[k:], strict=True):
            for name, x in a.as_dict().items():
                np.testing.assert_array_equal(x, getattr(b, name))
    other = _build(_corpus(tmp_path), seed=5).train
    with pytest.raises(ValueError, match="seed=0"):
        iter(other).set_state(states[1])


def test_held_out_split_disjoint(tmp_path):
    train, held = held_out_split(1000, 0.1)
    assert not set(train) & set(held) and len(train) + len(held) == 1000
    # binomial(1000, 0.1): sd 9.5, so 100 +- 40 fails only for a broken hash
    assert 60 <= len(held) <= 140
    path = _corpus(tmp_path, n=40)
    data = _build(path, held_out_fraction=0.25, num_epochs=1)
    bos = "<｜begin▁of▁sentence｜>"
    got_train = {t.removeprefix(bos) for t in _texts(_batches(data.train))}
    got_held = {t.removeprefix(bos) for t in _texts(_batches(data.held_out))}
    texts = {json.loads(x)["text"] for x in open(path)}
    assert got_train | got_held == texts and not got_train & got_held and got_held
    assert (data.num_train_docs, data.num_held_out_docs) == (len(got_train), len(got_held))
    assert "bytes" in data.describe() and data.mode is TokenizerMode.BYTES


# ------------------------------------------------------------------------------------------
# sources and errors


def test_sources_text_files_dirs_globs_and_chat(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("print(1)\n")
    (tmp_path / "d" / "a.md").write_text("# title\n")
    (tmp_path / "d" / ".hidden").write_text("skip me")
    chat = {"messages": CHAT[1:3], "thinking": True}
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "t"}) + "\n\n" + json.dumps(chat))
    c = load_corpus([tmp_path / "d", str(tmp_path / "*.jsonl")])
    assert [c.where(i).removeprefix(str(tmp_path)) for i in range(len(c))] == [
        "/d/a.md",
        "/d/b.py",
        "/s.jsonl:1",
        "/s.jsonl:3",
    ]
    bt = ByteTokenizer()
    assert bt.decode(encode_document(c, 1, bt).tokens) == "<｜begin▁of▁sentence｜>print(1)\n" + EOS
    chat_doc = encode_document(c, 3, bt)
    parts = [bt.decode(chat_doc.tokens[a:b]) for a, b in _runs(chat_doc.mask)]
    assert parts == ["Add them.</think>4" + EOS]  # thinking mode from the record


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "missing.txt: no such file"),
        ("empty.txt", b"", "empty.txt: empty file"),
        ("blank.jsonl", b"\n  \n", "blank.jsonl: no documents"),
        ("latin1.txt", "ok\ncaf\xe9".encode("latin-1"), "latin1.txt:2: not UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
        ("bytes.jsonl", b'{"text": "\xff"}\n', "bytes.jsonl:1: not UTF-8"),
        (
            "neither.jsonl",
            b'{"txt": "a"}\n',
            'neither.jsonl:1: expected an object with either "text"',
        ),
        ("both.jsonl", b'{"text": "a", "messages": []}\n', "both.jsonl:1: expected"),
        ("role.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n', "role.jsonl:1: mess"),
        ("noans.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n', "noans.jsonl:1: no"),
        ("think.jsonl", b'{"messages": [], "thinking": 1}\n', 'think.jsonl:1: "thinking"'),
    ],
)
def test_errors_name_the_file(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_corpus(tmp_path / name)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_errors_globs_and_directories(tmp_path):
    with pytest.raises(DataError, match=r"\*\.txt: no files match"):
        load_corpus(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: directory holds no files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(DataError, match=r"leaves \d train and \d held-out"):
        _build(str(tmp_path / "a.txt"), held_out_fraction=0.5)


def test_byte_decode_of_ids_that_are_no_byte():
    # a model with a larger vocabulary (e.g. a tiny model with 1,024 ids) can emit any id:
    # decoding shows U+FFFD there instead of raising, and keeps BOS / EOS and the bytes around
    bt = ByteTokenizer()
    ids = [bt.bos_id, *(b + 2 for b in "é".encode()), 300, bt.vocab_size, *(b + 2 for b in b"x")]
    assert (
        bt.decode([*ids, bt.eos_id]) == "<｜begin▁of▁sentence｜>é\ufffd\ufffdx<｜end▁of▁sentence｜>"
    )
