"""dedup.py: MinHash/LSH near-duplicates, cross-source priority, boilerplate segments, 13-gram decontamination."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dedup  # noqa: E402
from data import batch_ngram_hashes, batch_word_hashes, normalize_words  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def prose(seed, n_words=150):
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, int(rng.integers(3, 9)))) for _ in range(n_words)]
    sents = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3))


def edit(text, k, seed):
    rng = np.random.default_rng(seed)
    words = text.split(" ")
    for _ in range(k):
        words[int(rng.integers(len(words)))] = "zzedit" + str(int(rng.integers(1000)))
    return " ".join(words)


def shingles(text, n=5):
    w = normalize_words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a, b):
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_out(out_dir, source):
    d = os.path.join(out_dir, source)
    if not os.path.isdir(d):
        return []
    return [json.loads(l) for f in sorted(os.listdir(d)) for l in open(os.path.join(d, f))]


def cfg_for(tmp_path, inputs, **kw):
    base = dict(inputs=inputs, out_dir=str(tmp_path / "out"), decontaminate=False, workers=2, batch_docs=64,
                segment_sketch_mb=1)
    base.update(kw)
    return dedup.DedupConfig(**base)


# ---------------------------------------------------------------- building blocks

def test_signature_agreement_estimates_jaccard():
    a, b = dedup.minhash_permutations(256, seed=0)
    base = prose(0, 400)
    docs = [base] + [edit(base, k, k) for k in (2, 8, 20, 40)]
    sh, counts = batch_ngram_hashes(*batch_word_hashes(docs), 5, short_docs_as_one=True)
    sig = dedup.minhash_signatures(sh, counts, a, b, block=500)  # several blocks
    for i in range(1, len(docs)):  # one estimate: within 4 standard deviations
        J = jaccard(docs[0], docs[i])
        assert abs((sig[0] == sig[i]).mean() - J) < 4 * np.sqrt(J * (1 - J) / 256) + 1e-9
    # unbiased: averaged over 10 independent signature families the estimate is within ~0.01
    est = np.mean([(s[0] == s[1:]).mean(axis=1) for s in
                   (dedup.minhash_signatures(sh, counts, *dedup.minhash_permutations(256, seed)) for seed in range(10))],
                  axis=0)
    assert np.abs(est - [jaccard(docs[0], d) for d in docs[1:]]).max() < 0.03
    # batching does not change a document's signature
    one = dedup.minhash_signatures(*batch_ngram_hashes(*batch_word_hashes(docs[2:3]), 5, True), a, b)
    assert np.array_equal(one[0], sig[2])


def test_batch_word_hashes_match_the_normalized_words():
    texts = ["Hello, World! hello\tworld", "", "  ", "Ünïcode wörds, café;CAFÉ", "x"]
    h, counts = batch_word_hashes(texts)
    words = [w for t in texts for w in normalize_words(t)]
    assert counts.tolist() == [len(normalize_words(t)) for t in texts] == [4, 0, 0, 4, 1]
    seen = {}
    assert all(seen.setdefault(w, x) == x for w, x in zip(words, h.tolist()))  # same word, same hash
    assert len(set(h.tolist())) == len(set(words))  # different words, different hashes


def test_band_choice_matches_datasketch():
    from datasketch.lsh import _optimal_param
    assert dedup.choose_bands_rows(0.8, 128) == _optimal_param(0.8, 128, 0.05, 0.95) == (16, 8)


def test_short_documents_get_signatures_and_empty_ones_are_distinct():
    sh, counts = batch_ngram_hashes(*batch_word_hashes(["a b", "a b", "a c", "x y z w v u", "", "!!"]), 5,
                                    short_docs_as_one=True)
    assert counts.tolist() == [1, 1, 1, 2, 1, 1]
    assert sh[0] == sh[1] != sh[2] and sh[5] == sh[6] != sh[0]


def test_lsh_buckets_of_many_copies_stay_linear_and_union_find_joins_them():
    keys = np.zeros((1000, 3), dtype=np.uint64)  # 1000 identical documents
    keys[:, 1] = np.arange(1000)
    pairs = dedup.lsh_candidate_pairs(keys)
    assert len(pairs) < 2 * 1000
    roots = dedup.union_find_clusters(1002, pairs)
    assert (roots[:1000] == 0).all() and roots[1000] == 1000 and roots[1001] == 1001
    assert dedup.union_find_clusters(5, np.array([[3, 4], [1, 3], [0, 2]])).tolist() == [0, 1, 0, 1, 1]


# ---------------------------------------------------------------- near-duplicates end to end

def test_finds_planted_duplicates_and_keeps_distinct_documents(tmp_path):
    distinct = [prose(i) for i in range(300)]
    dups = [edit(distinct[i], 1, 1000 + i) for i in range(0, 60, 2)]  # Jaccard ~0.94: found with certainty
    dups += [distinct[1]] * 3  # exact copies: a cluster of 4
    far = [edit(distinct[i], 25, 2000 + i) for i in range(100, 110)]  # Jaccard < 0.5: not duplicates
    recs = [{"text": t, "id": i} for i, t in enumerate(distinct + dups + far)]
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), recs)
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl")))
    roots = res["roots"]
    for k, i in enumerate(range(0, 60, 2)):
        assert roots[300 + k] == roots[i], f"planted copy of doc {i} (J={jaccard(distinct[i], dups[k]):.2f}) missed"
    assert (roots[330:333] == roots[1]).all()
    assert len(set(roots[:300].tolist())) == 300  # distinct documents never merged
    assert all(roots[333 + k] == 333 + k for k in range(10))  # heavily edited copies stay
    out = read_out(str(tmp_path / "out"), "web")
    assert len(out) == 300 + 10
    st = json.load(open(tmp_path / "out" / "stats.json"))
    assert st["totals"]["dropped"]["near_duplicate"]["docs"] == 33
    assert st["near_dup"]["cluster_size_histogram"]["4"] == 1 and st["near_dup"]["cluster_size_histogram"]["2"] == 30
    assert st["per_source"]["web"]["tokens_out"] < st["per_source"]["web"]["tokens_in"]


def test_cross_source_priority_then_score_then_length(tmp_path):
    base = [prose(i) for i in range(3)]
    # doc 0: in web (long) and in math (short): math is preferred by --priority
    write_jsonl(str(tmp_path / "in" / "web" / "a.jsonl"),
                [{"text": base[0] + " extra words here.", "score": 5.0}, {"text": base[1], "score": 2.0},
                 {"text": base[2]}])
    write_jsonl(str(tmp_path / "in" / "math" / "a.jsonl"),
                [{"text": base[0], "score": 1.0}, {"text": base[1], "score": 3.0},
                 {"text": edit(base[2], 1, 0) + " and a longer tail."}, {"text": edit(base[2], 1, 0)}])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in"), priority="math,web"))
    web = [r["text"] for r in read_out(str(tmp_path / "out"), "web")]
    math = [r["text"] for r in read_out(str(tmp_path / "out"), "math")]
    assert web == [] and base[0] in math and base[1] in math
    assert edit(base[2], 1, 0) + " and a longer tail." in math and edit(base[2], 1, 0) not in math
    assert res["stats"]["near_dup"]["cross_source_clusters"] == 3
    # without a priority the input order decides (math sorts first), and the score breaks ties within one source
    res = dedup.run(cfg_for(tmp_path, f"web={tmp_path / 'in' / 'web'},math={tmp_path / 'in' / 'math'}"))
    assert base[0] + " extra words here." in [r["text"] for r in read_out(str(tmp_path / "out"), "web")]


def test_malformed_lines_and_empty_documents_are_counted_not_fatal(tmp_path):
    write_jsonl(str(tmp_path / "in" / "web.jsonl"),
                [{"text": prose(0)}, "{oops", {"text": ""}, {"no_text": 1}, {"text": prose(1)}, {"text": "  \n "}])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl")))
    d = res["stats"]["per_source"]["web"]["dropped"]
    assert d["malformed"]["docs"] == 2 and d["empty"]["docs"] == 2
    assert res["stats"]["per_source"]["web"]["docs_in"] == 6 and res["stats"]["per_source"]["web"]["docs_out"] == 2


def test_missing_input_fails_with_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        dedup.run(cfg_for(tmp_path, str(tmp_path / "missing.jsonl")))


# ---------------------------------------------------------------- boilerplate segments

def test_segment_dedup_removes_lines_repeated_across_many_documents(tmp_path):
    banner = "Subscribe to our newsletter for weekly updates and offers!"
    docs = [prose(i) + "\n" + banner for i in range(30)]
    docs += [prose(100 + i) for i in range(5)]
    docs.append(banner)  # nothing but boilerplate: emptied, dropped
    write_jsonl(str(tmp_path / "in" / "web" / "a.jsonl"), [{"text": t} for t in docs])
    write_jsonl(str(tmp_path / "in" / "code" / "a.jsonl"), [{"text": prose(200 + i) + "\n" + banner} for i in range(25)])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in"), segment_min_docs=20, near_dedup=False))
    web = read_out(str(tmp_path / "out"), "web")
    assert len(web) == 35 and not any(banner in r["text"] for r in web)
    assert web[0]["text"] == prose(0)  # the rest of the document is untouched
    code = read_out(str(tmp_path / "out"), "code")
    assert all(banner in r["text"] for r in code)  # code is skipped by default (its repeats are content)
    st = res["stats"]["per_source"]["web"]
    assert st["segment_lines_removed"] == 31 and st["dropped"]["segment_emptied"]["docs"] == 1
    # under the count threshold nothing is removed
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web"), segment_min_docs=100, near_dedup=False))
    assert res["stats"]["totals"]["segment_lines_removed"] == 0


def test_count_min_sketch_never_undercounts():
    cms = dedup.CountMinSketch(1)
    h = np.random.default_rng(0).integers(0, 2**63, 5000, dtype=np.uint64)
    for _ in range(3):
        cms.add(h[:100])
    cms.add(h)
    est = cms.estimate(h)
    assert (est[:100] >= 4).all() and (est[100:] >= 1).all() and np.median(est[100:]) == 1


# ---------------------------------------------------------------- decontamination

def test_13gram_overlap_with_an_eval_set_drops_the_document(tmp_path):
    question = ("Natalia sold clips to forty eight of her friends in April and then she sold half as many "
                "clips in May how many clips did she sell")
    write_jsonl(str(tmp_path / "evals" / "mini.jsonl"), [{"question": question, "answer": "72"}])
    words = question.split()
    leaked = prose(0) + "\nWe saw: " + " ".join(words[3:16]) + " (13 words)."
    near_miss = prose(1) + "\n" + " ".join(words[3:15]) + "."  # 12 words: kept
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": leaked}, {"text": near_miss}, {"text": prose(2)}])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl"), decontaminate=True,
                            evals=str(tmp_path / "evals" / "mini.jsonl")))
    out = [r["text"] for r in read_out(str(tmp_path / "out"), "web")]
    assert leaked not in out and near_miss in out and len(out) == 2
    assert res["stats"]["decontaminated_by_eval"] == {"mini.jsonl": 1}
    assert res["stats"]["per_source"]["web"]["dropped"]["decontaminated"]["docs"] == 1


def test_eval_sets_missing_everywhere_is_a_clear_error(tmp_path):
    cfg = cfg_for(tmp_path, "x", decontaminate=True, evals="gsm8k", eval_dir=str(tmp_path / "none"))

    class Offline:
        def list_repo_files(self, *a, **k):
            raise ConnectionError("offline")

    with pytest.raises(SystemExit, match="no eval set found.*--decontaminate=false"):
        dedup.resolve_eval_files(cfg, hub=Offline())


def test_eval_readers_handle_csv_json_and_parquet(tmp_path):
    (tmp_path / "m.csv").write_text('"What is two plus two?",3,4,5,6,B\n')
    (tmp_path / "s.json").write_text(json.dumps([{"question": "Why is the sky blue?", "support": "Rayleigh"}]))
    assert dedup.read_eval_items(str(tmp_path / "m.csv")) == ["What is two plus two? 3 4 5 6 B"]
    assert dedup.read_eval_items(str(tmp_path / "s.json")) == ["Why is the sky blue? Rayleigh"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"q": ["a b"], "choices": [["c", "d"]], "n": [1]}), tmp_path / "e.parquet")
    assert dedup.read_eval_items(str(tmp_path / "e.parquet")) == ["a b c d"]


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "gsm8k", "test.jsonl")), reason="shared data not present")
def test_real_eval_sets_decontaminate_a_leaked_gsm8k_question(tmp_path):
    cfg = cfg_for(tmp_path, str(tmp_path / "in"), decontaminate=True, evals="gsm8k,arc_easy,mmlu,hellaswag",
                  eval_dir=SHARED)
    files = dedup.resolve_eval_files(cfg)
    assert set(files) == {"gsm8k", "arc_easy", "mmlu", "hellaswag"} and len(files["mmlu"]) == 57
    q = json.loads(open(os.path.join(SHARED, "gsm8k", "test.jsonl")).readline())["question"]
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": prose(0) + "\n" + q}, {"text": prose(1)}])
    res = dedup.run(cfg)
    assert res["stats"]["decontaminated_by_eval"]["gsm8k"] == 1
    assert res["stats"]["totals"]["docs_out"] == 1
