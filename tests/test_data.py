"""data.py: readers, download (with a local stand-in for the Hub), quality gates, token shards."""
import gzip
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import shards  # noqa: E402
from data import GateConfig  # noqa: E402
from hub_standin import LocalHub, OfflineHub  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def prose(seed, n_words=120):
    """Plausible prose: distinct words, sentences that end in periods, a few lines."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, int(rng.integers(3, 9)))) for _ in range(n_words)]
    sents = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3))


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


# ---------------------------------------------------------------- config parser

def test_cli_is_a_command_plus_common_parse_config(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown config key|unknown option"):
        data.main(["gate", "--nope=1"])
    with pytest.raises(SystemExit, match="max_shards"):
        data.main(["download", "--max_shards=many"])
    with pytest.raises(SystemExit, match="unknown command 'gates'.*download\\|gate\\|tokenize"):
        data.main(["gates"])
    with pytest.raises(SystemExit, match="no command"):
        data.main([])
    assert not hasattr(data, "parse_cli")  # one parser: common.parse_config


# ---------------------------------------------------------------- gates, one by one

def gate_of(text, **overrides):
    cfg = GateConfig(**overrides)
    return data.first_failed_gate({"text": text}, cfg)


def test_good_prose_passes_every_gate():
    for seed in range(5):
        assert gate_of(prose(seed)) is None


def test_gate_length():
    assert gate_of(prose(0, 30)) == "length"
    assert gate_of(prose(0, 30), gate_length=False) is None


def test_gate_word_length():
    rng = np.random.default_rng(0)
    long_words = " ".join("".join(rng.choice(list("abcdef"), 14)) for _ in range(80)) + "."
    assert gate_of(long_words) == "word_length"
    assert gate_of(long_words, gate_word_length=False) is None


def test_gate_symbols():
    text = prose(1) + "\n" + " ".join(f"#tag{i}" for i in range(30)) + "."
    assert gate_of(text) == "symbols"
    assert gate_of(text, gate_symbols=False) is None


def test_gate_line_punct():
    words = prose(2).replace(".", "").split()
    nav = "\n".join(" ".join(words[i:i + 3]) for i in range(0, len(words), 3))  # menu-like lines
    assert gate_of(nav) == "line_punct"
    assert gate_of(nav, gate_line_punct=False) is None


def test_gate_dup_lines():
    text = prose(3) + "\n" + "\n".join(["Click here to subscribe to our newsletter today."] * 10)
    assert gate_of(text) == "dup_lines"
    assert gate_of(text, gate_dup_lines=False) == "dup_ngrams"  # repeated lines repeat n-grams too
    assert gate_of(text, gate_dup_lines=False, gate_dup_ngrams=False) is None


def test_gate_dup_ngrams():
    text = prose(4, 60).replace("\n", " ") + " " + " ".join(["buy cheap shoes online now."] * 12)
    assert gate_of(text, gate_dup_lines=False) == "dup_ngrams"
    assert gate_of(text, gate_dup_lines=False, gate_dup_ngrams=False) is None


def test_int_score_gate_applies_only_where_rows_have_a_score():
    cfg = GateConfig(min_int_score=3)
    assert data.first_failed_gate({"text": prose(0), "int_score": 2}, cfg) == "int_score"
    assert data.first_failed_gate({"text": prose(0), "int_score": 4}, cfg) is None
    assert data.first_failed_gate({"text": prose(0)}, cfg) is None


# ---------------------------------------------------------------- readers

def test_jsonl_malformed_lines_and_empty_docs_are_counted_and_skipped(tmp_path):
    p = str(tmp_path / "src" / "a.jsonl")
    write_jsonl(p, [{"text": "one"}, "{not json", {"text": ""}, {"text": "   "}, {"other": 1}, [1, 2],
                    {"text": "two", "url": "u", "int_score": 3}, ""])
    counts = {}
    recs = list(data.iter_corpus(str(tmp_path / "src"), counts=counts))
    assert [r["text"] for _, r in recs] == ["one", "two"]
    assert recs[1][1]["url"] == "u" and recs[1][1]["int_score"] == 3
    c = counts["src"]
    assert (c["read"], c["malformed"], c["empty"]) == (2, 3, 2)


def test_gzip_jsonl_parquet_and_text_read_the_same_way(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "code here"}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2", None], "int_score": [1, 4, 2], "junk": [0, 0, 0]}),
                   tmp_path / "p.parquet", row_group_size=2)
    (tmp_path / "t.txt").write_text("doc a<|endoftext|>doc b<|endoftext|>")
    out = {}
    for name in ("g.jsonl.gz", "p.parquet", "t.txt"):
        counts = {}
        out[name] = [r for _, r in data.iter_corpus(str(tmp_path / name), counts=counts)]
    assert out["g.jsonl.gz"] == [{"text": "code here"}]
    assert out["p.parquet"] == [{"text": "p1", "int_score": 1}, {"text": "p2", "int_score": 4}]
    assert [r["text"] for r in out["t.txt"]] == ["doc a", "doc b"]


def test_text_without_separators_is_cut_into_bounded_documents(tmp_path):
    lines = [f"line {i} of a long book with no separators at all." for i in range(3000)]
    (tmp_path / "book.txt").write_text("\n".join(lines))
    docs = [r["text"] for _, r in data.iter_corpus(str(tmp_path / "book.txt"), max_doc_chars=10_000)]
    assert len(docs) > 10 and max(map(len, docs)) <= 10_000
    assert "".join(docs) == "\n".join(lines)  # cut at newlines, nothing lost


def test_input_layout_names_sources(tmp_path):
    write_jsonl(str(tmp_path / "root" / "web" / "part_0.jsonl"), [{"text": "w"}])
    write_jsonl(str(tmp_path / "root" / "math" / "x" / "y.jsonl"), [{"text": "m"}])
    write_jsonl(str(tmp_path / "root" / "extra.jsonl"), [{"text": "e"}])
    got = dict(data.expand_inputs(str(tmp_path / "root")))
    assert set(got) == {"web", "math", "extra"}
    got = dict(data.expand_inputs(f"named={tmp_path / 'root' / 'web'}"))
    assert list(got) == ["named"]


def test_missing_input_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist.*download"):
        data.expand_inputs(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- download (hub_standin.LocalHub stands in for the Hub)

def test_download_takes_max_shards_in_order_resumes_and_gates_read_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    repo = tmp_path / "hub" / "HuggingFaceFW" / "fineweb-edu"
    for k in range(3):
        (repo / "sample" / "10BT").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [prose(10 * k + i) for i in range(4)], "int_score": [1, 3, 4, 5],
                                 "score": [1.2, 3.1, 4.0, 4.9]}), repo / "sample" / "10BT" / f"00{k}_00000.parquet")
    (repo / "README.md").write_text("not data")
    hub = LocalHub(str(tmp_path / "hub"))
    raw = str(tmp_path / "raw")
    paths = data.download_source("fineweb_edu", raw, max_shards=2, hub=hub)
    assert [os.path.basename(p) for p in paths] == ["000_00000.parquet", "001_00000.parquet"]
    data.download_source("fineweb_edu", raw, max_shards=2, hub=hub)
    assert len(hub.downloads) == 2  # second call found the files and fetched nothing
    cfg = GateConfig(inputs=raw, out_dir=str(tmp_path / "gated"), workers=1)
    stats = data.gate_corpus(cfg)
    st = stats["fineweb_edu"]
    assert st["docs_in"] == 8 and st["dropped"]["int_score"]["docs"] == 2 and st["docs_out"] == 6
    out = [json.loads(l) for l in open(tmp_path / "gated" / "fineweb_edu" / "part_00000.jsonl")]
    assert len(out) == 6 and all(r["int_score"] >= 3 and "score" in r for r in out)


def test_download_without_network_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="cannot list .*put parquet/jsonl/txt files under"):
        data.download_source("fineweb_edu", str(tmp_path), 1, hub=OfflineHub())
    # files already there (an earlier download, or put by hand) are used as they are
    write_jsonl(str(tmp_path / "fineweb_edu" / "local.jsonl"), [{"text": "x"}])
    assert data.download_source("fineweb_edu", str(tmp_path), 1, hub=OfflineHub()) == \
        [str(tmp_path / "fineweb_edu" / "local.jsonl")]
    with pytest.raises(SystemExit, match="unknown source"):
        data.expand_source_names("nope")
    assert data.expand_source_names("edu_math_code,finemath") == ["fineweb_edu", "finemath", "code"]


def test_gate_corpus_counts_each_gate_per_source(tmp_path):
    good = [{"text": prose(i)} for i in range(6)]
    bad = [{"text": prose(0, 20)}, {"text": prose(1) + "\n" + "\n".join(["Same line repeated here again."] * 12)}]
    write_jsonl(str(tmp_path / "in" / "web" / "a.jsonl"), good + bad + ["{broken", {"text": ""}])
    write_jsonl(str(tmp_path / "in" / "web2" / "a.jsonl"), good[:2])
    stats = data.gate_corpus(GateConfig(inputs=str(tmp_path / "in"), out_dir=str(tmp_path / "out"), workers=2,
                                        batch_docs=3))
    st = stats["web"]
    assert st["docs_in"] == 8 and st["docs_out"] == 6
    assert st["dropped"]["length"]["docs"] == 1 and st["dropped"]["dup_lines"]["docs"] == 1
    assert st["dropped"]["length"]["tokens"] == 20
    assert st["malformed"] == 1 and st["empty"] == 1
    assert stats["web2"]["docs_out"] == 2
    assert json.load(open(tmp_path / "out" / "gate_stats.json"))["web"]["docs_out"] == 6


# ---------------------------------------------------------------- token shards

@pytest.fixture(scope="module")
def small_tok():
    from tokenizer import train_tokenizer
    return train_tokenizer([prose(i) for i in range(20)], vocab_size=300, name="test")


def test_shard_round_trip_uint16(tmp_path, small_tok):
    docs = [small_tok.encode(prose(i)) for i in range(5)]
    n = shards.write_shards(docs, small_tok, str(tmp_path), "train", shard_tokens=500)
    loaded = shards.load_shards(str(tmp_path), "train", expect_tokenizer=small_tok.fingerprint)
    assert n == sum(len(d) + 1 for d in docs) and len(loaded) > 1
    flat = np.concatenate([np.asarray(s) for s in loaded])
    assert flat.dtype == np.uint16
    expect = np.concatenate([[small_tok.bos_id] + d for d in docs])
    assert np.array_equal(flat, expect)
    meta = json.load(open(tmp_path / "meta.json"))
    assert meta["tokenizer"] == small_tok.fingerprint and meta["tokenizer_name"] == "test300"
    x, y = shards.sample_batch(loaded, 4, 16, np.random.default_rng(0))
    assert x.shape == (4, 16) and np.array_equal(x[:, 1:], y[:, :-1])


def test_large_vocab_shards_are_uint32(tmp_path):
    class BigTok:  # the few attributes a shard writer needs
        vocab_size, bos_id, fingerprint, name = 70_000, 69_999, "big", "big70000"

        def save(self, path):
            open(path, "w").write("{}")

    shards.write_shards([[1, 69_000, 5]], BigTok(), str(tmp_path), "train")
    (s,) = shards.load_shards(str(tmp_path), "train")
    assert s.dtype == np.uint32 and s.tolist() == [69_999, 1, 69_000, 5]


def test_tokenizer_mismatch_is_refused_with_a_clear_message(tmp_path, small_tok):
    shards.write_shards([small_tok.encode("hello world")], small_tok, str(tmp_path), "train")
    with pytest.raises(SystemExit, match="use tokenizer .* but the model uses deadbeef.*Re-tokenize"):
        shards.load_shards(str(tmp_path), "train", expect_tokenizer="deadbeef")
    with pytest.raises(SystemExit, match="meta.json missing"):
        shards.load_shards(str(tmp_path / "empty"), "train")
    # and a shard directory never mixes tokenizers: writing another one's shards into it is refused
    from tokenizer import train_tokenizer
    other = train_tokenizer(["something else entirely"] * 5, vocab_size=270, name="other")
    before = open(tmp_path / "train_000000.bin", "rb").read()
    with pytest.raises(SystemExit, match="already holds shards of tokenizer"):
        shards.write_shards([other.encode("hi")], other, str(tmp_path), "train")
    assert open(tmp_path / "train_000000.bin", "rb").read() == before


def test_tokenize_cli_writes_train_and_val_shards(tmp_path, small_tok):
    write_jsonl(str(tmp_path / "dedup" / "web" / "part_00000.jsonl"), [{"text": prose(i)} for i in range(30)] + ["{bad"])
    tok_path = str(tmp_path / "tok.json")
    small_tok.save(tok_path)
    out = str(tmp_path / "shards")
    data.main(["tokenize", f"--inputs={tmp_path / 'dedup'}", f"--out_dir={out}", f"--tokenizer={tok_path}",
               "--val_every=10", "--val_min_docs=3", "--batch_docs=4", "--workers=2"])
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == small_tok.fingerprint
    train = shards.load_shards(out, "train", small_tok.fingerprint)
    val = shards.load_shards(out, "val", small_tok.fingerprint)
    n_bos = sum(int((np.asarray(s) == small_tok.bos_id).sum()) for s in train + val)
    assert n_bos == 30 and int((np.asarray(val[0]) == small_tok.bos_id).sum()) == 3
    # every document decodes back to its text
    flat = np.asarray(train[0]).tolist()
    first = flat[1:flat.index(small_tok.bos_id, 1)]
    assert small_tok.decode(first) == prose(1)


def test_tokenize_can_train_its_tokenizer(tmp_path):
    write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"text": prose(i)} for i in range(10)])
    out = str(tmp_path / "shards")
    data.main(["tokenize", f"--inputs={tmp_path / 'in'}", f"--out_dir={out}", "--tokenizer=train",
               "--vocab_size=280", "--val_every=5", "--workers=1"])
    from tokenizer import load_tokenizer
    tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
    assert tok.vocab_size == 280
    assert shards.load_shards(out, "val", tok.fingerprint)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "tinystories")), reason="shared data not present")
def test_real_text_corpus_reads_as_documents():
    counts = {}
    docs = [r["text"] for _, r in data.iter_corpus(os.path.join(SHARED, "tinystories", "tinystories_sample.txt"),
                                                   counts=counts)]
    assert 2000 < len(docs) < 2400 and all(d.strip() for d in docs)
    kept = sum(data.first_failed_gate({"text": d}, GateConfig()) is None for d in docs[:200])
    assert kept > 20  # short children's stories: the length gate drops many, not all


def test_sample_batch_reaches_every_window_and_no_further():
    import numpy as np
    from shards import sample_batch
    shard = np.arange(10, dtype=np.uint16)  # windows of 4+1 tokens start at 0..5
    rng = np.random.default_rng(0)
    firsts = set()
    for _ in range(200):
        x, y = sample_batch([shard], 8, 4, rng)
        assert (y == x + 1).all()
        firsts |= set(x[:, 0].tolist())
    assert firsts == {0, 1, 2, 3, 4, 5}


# ---------------------------------------------------------------- Gopher statistics, by hand

def test_gopher_statistics_match_hand_computations():
    # words: letters/digits runs; typographic characters normalised first
    assert data.split_words("It\u2019s a \u201cgood\u201d day\u2014really\u2026 x_y 3.5") == \
        ["It", "s", "a", "good", "day", "really", "x", "y", "3", "5"]
    # duplicate lines: "a b" repeats once -> 1 of 4 lines; its 3 chars of the 17-char text
    text = "a b\ncc dd\na b\neee"
    assert data.duplicate_fractions(text.split("\n"), len(text)) == (1 / 4, 3 / 17)
    # top 2-gram: "x y" occurs 3 times in "x y x y x y z" (13 chars): 3 * len("x y") / 13
    w = "x y x y x y z".split()
    assert data.top_ngram_char_frac(w, 2, 13) == 3 * 3 / 13
    # duplicated 5-grams over "a b c d e a b c d e a b": the scan (datatrove's find_all_duplicate)
    # adds 5-grams a..e, b..a, c..b, d..c, e..d, then meets "a b c d e" again at word 5: 5 chars
    # (spaces not counted), jumps to word 10, where no 5-gram starts. The first occurrence is not counted.
    w = "a b c d e a b c d e a b".split()
    assert data.dup_ngram_char_frac(w, 5, 23) == 5 / 23
    assert data.dup_ngram_char_frac("a b c d e f".split(), 5, 11) == 0.0


def gate_of_text(text, gate, **overrides):
    cfg = GateConfig(**overrides)
    return getattr(data, "gate_" + gate)(data.Doc(text), cfg)


def test_each_gate_at_its_hand_computed_boundary():
    # length: 50 words pass, 49 fail
    assert gate_of_text(" ".join(["word"] * 50), "length") and not gate_of_text(" ".join(["word"] * 49), "length")
    # mean word length: "ab abcd" = 3.0 passes, "ab abc" = 2.5 fails
    assert gate_of_text("ab abcd", "word_length") and not gate_of_text("ab abc", "word_length")
    # symbols: '#' and ellipses counted separately: 1 '#' + 1 '...' in 10 words = 0.1 each: passes;
    # (the old rule summed them: 0.2, dropped)
    ten = " ".join(["word"] * 9)
    assert gate_of_text(ten + " #tag ...", "symbols")
    assert not gate_of_text(ten + " #tag #tag", "symbols") and not gate_of_text(ten + " \u2026 \u2026", "symbols")
    # line punctuation: lines split on "\n", empty ones counted: 1 of 8 ends in '.', 0.125 > 0.12 passes;
    # 1 of 9 = 0.111 fails; a closing curly quote counts as '"'
    assert gate_of_text("A.\n" + "b\n" * 6 + "c", "line_punct")
    assert not gate_of_text("A.\n" + "b\n" * 7 + "c", "line_punct")
    assert gate_of_text("He said \u201chi.\u201d\n" + "b\n" * 6 + "c", "line_punct")
    # duplicate lines: 3 of 10 lines repeat (0.3, not above 0.3) and short: passes; 4 of 10 fails
    lines = ["line number %d here" % i for i in range(7)]
    assert gate_of_text("\n".join(lines + lines[:3]), "dup_lines", max_dup_line_char_frac=1.0)
    assert not gate_of_text("\n".join(lines[:6] + lines[:4]), "dup_lines", max_dup_line_char_frac=1.0)


def test_dup_ngram_gate_counts_repeats_only_like_datatrove():
    """A paragraph that restates one 6-word phrase once is not dropped: only the repeat counts
    (the old rule counted both copies and divided by characters without spaces)."""
    base = prose(11, 100).replace("\n", " ")
    phrase = "the total cost of the trip"
    text = f"{base} Then {phrase} was computed. Finally {phrase} was paid."
    doc = data.Doc(text)
    frac5 = data.dup_ngram_char_frac(doc.words, 5, len(doc.text))
    # one repeated 6-word phrase: two 5-grams repeat, overlapping; the scan counts the first repeat
    # ("the total cost of the", 17 chars) and jumps past it, then "trip was paid ..." is new
    assert frac5 == len("thetotalcostofthe") / len(text)
    assert data.gate_dup_ngrams(doc, GateConfig())


# ---------------------------------------------------------------- bad inputs: one line naming the file

def test_truncated_gzip_and_parquet_and_non_utf8_are_one_clear_line(tmp_path):
    good = "\n".join(json.dumps({"text": prose(i)}) for i in range(200)).encode()
    gz = gzip.compress(good)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    with pytest.raises(SystemExit, match=r"cut.jsonl.gz is truncated or damaged.*download"):
        list(data.read_documents(str(tmp_path / "cut.jsonl.gz")))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [prose(i) for i in range(50)]}), tmp_path / "full.parquet")
    raw = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(SystemExit, match=r"cut.parquet is truncated or damaged"):
        list(data.read_documents(str(tmp_path / "cut.parquet")))
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"latin.jsonl line 2 is not UTF-8.*iconv"):
        list(data.read_documents(str(tmp_path / "latin.jsonl")))


def test_damaged_shards_are_one_clear_line(tmp_path, small_tok):
    d = str(tmp_path)
    shards.write_shards([small_tok.encode(prose(i)) for i in range(3)], small_tok, d, "train")
    path = tmp_path / "train_000000.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(SystemExit, match="train_000000.bin has .* bytes, not a whole number"):
        shards.load_shards(d, "train")
    bad = np.frombuffer(raw, dtype=np.uint16).copy()
    bad[5] = small_tok.vocab_size + 7
    path.write_bytes(bad.tobytes())
    with pytest.raises(SystemExit, match=f"token id {small_tok.vocab_size + 7} >= vocab_size"):
        shards.load_shards(d, "train")
    path.unlink()
    with pytest.raises(SystemExit, match="train_000000.bin .*is missing"):
        shards.load_shards(d, "train")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(SystemExit, match="meta.json is damaged"):
        shards.load_shards(d, "train")


def test_tokenize_into_another_tokenizers_shards_changes_nothing(tmp_path, small_tok):
    write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"text": prose(i)} for i in range(12)])
    out = tmp_path / "shards"
    shards.write_shards([small_tok.encode(prose(i)) for i in range(3)], small_tok, str(out), "train")
    small_tok.save(str(out / "tokenizer.json"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="already holds shards of tokenizer.*nothing was changed"):
        data.main(["tokenize", f"--inputs={tmp_path / 'in'}", f"--out_dir={out}", "--tokenizer=train",
                   "--vocab_size=270", "--workers=1"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tokenizer_is_named_by_what_it_learned_and_val_has_a_minimum(tmp_path, capsys):
    write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"text": "tiny tiny corpus"} for _ in range(60)])
    out = str(tmp_path / "shards")
    data.main(["tokenize", f"--inputs={tmp_path / 'in'}", f"--out_dir={out}", "--tokenizer=train",
               "--vocab_size=5000", "--workers=1", "--val_every=200", "--val_min_docs=100"])
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["vocab_size"] < 5000 and meta["tokenizer_name"] == f"bpe{meta['vocab_size']}"
    assert "warning: the corpus filled only" in capsys.readouterr().out
    # 60 documents, val_every=200 would give 1 val document; at most 1 in 10 -> 6
    val = np.asarray(shards.load_shards(out, "val")[0])
    assert int((val == meta["bos_id"]).sum()) == 6
    cfg = data.TokenizeConfig(val_every=200, val_min_docs=100)
    assert data.val_period(cfg, "", n_docs=100_000) == 200 and data.val_period(cfg, "", n_docs=5000) == 50
