"""dedup.py: MinHash/LSH near-duplicates, cross-source priority, boilerplate segments, 13-gram decontamination."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks  # noqa: E402
import dedup  # noqa: E402
from dedup import batch_ngram_hashes, batch_word_hashes  # noqa: E402
from data import normalize_words  # noqa: E402
from hub_standin import OfflineHub  # noqa: E402

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


def test_lsh_buckets_emit_every_pair_up_to_the_bound_and_count_the_rest():
    keys = np.zeros((1000, 3), dtype=np.uint64)  # band 0: one bucket of 1000; band 1: all distinct
    keys[:, 1] = np.arange(1000)
    keys[:, 2] = np.arange(1000) // 4 + 5000  # band 2: buckets of 4 -> all 6 pairs each
    pairs, info = dedup.lsh_candidate_pairs(keys, max_bucket=50)
    # hand count: band 0 pairs each member with its <= 49 predecessors; band 2's pairs are among them
    assert len(pairs) == 50 * 49 // 2 + 950 * 49
    assert info == {"large_buckets": 1, "pairs_left_out": 1000 * 999 // 2 - len(pairs)}
    pairs, info = dedup.lsh_candidate_pairs(keys[:40], max_bucket=50)  # under the bound: all pairs
    assert len(pairs) == 40 * 39 // 2 and info["pairs_left_out"] == 0
    roots = dedup.union_find_clusters(1002, dedup.lsh_candidate_pairs(keys, 50)[0])
    assert (roots[:1000] == 0).all() and roots[1000] == 1000 and roots[1001] == 1001
    assert dedup.union_find_clusters(5, np.array([[3, 4], [1, 3], [0, 2]])).tolist() == [0, 1, 0, 1, 1]


def test_exact_jaccard_matches_python_sets_on_random_documents():
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    base = [prose(int(rng.integers(1 << 30)), int(rng.integers(3, 300))) for _ in range(40)]
    docs = base + [edit(base[i], int(rng.integers(0, 30)), int(rng.integers(1 << 30))) for i in range(40)]
    sh, counts = batch_ngram_hashes(*batch_word_hashes(docs), 5, short_docs_as_one=True)
    values, sizes = dedup.shingle_values(sh), counts
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    pairs = np.stack([rng.integers(0, 80, 500), rng.integers(0, 80, 500)], axis=1)
    got = dedup.exact_jaccard(pairs, values, offsets, chunk=777)  # several chunks

    def ref(a, b):
        sa, sb = shingles(docs[a]) or {tuple(normalize_words(docs[a]))}, shingles(docs[b]) or {tuple(normalize_words(docs[b]))}
        return len(sa & sb) / len(sa | sb)
    assert np.allclose(got, [ref(a, b) for a, b in pairs])
    fp = dedup.set_fingerprints(values, sizes)
    sh2, counts2 = batch_ngram_hashes(*batch_word_hashes([docs[0] + "  ", docs[0].upper()]), 5, True)
    fp2 = dedup.set_fingerprints(dedup.shingle_values(sh2), counts2)
    assert fp[0] != fp[1] and fp2[0] == fp2[1] == fp[0]


def test_verification_is_exact_at_the_threshold(tmp_path):
    """Pairs just above 0.8 are always joined, pairs just below never: the decision is the exact
    Jaccard of the shingle sets, not the signature's estimate (std ~0.035 at 128 permutations)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    docs, planted = [prose(1000 + i, 300) for i in range(60)], []
    for i in range(60):
        for _ in range(200):
            cand = edit(docs[i], int(rng.integers(1, 12)), int(rng.integers(1 << 30)))
            j = jaccard(docs[i], cand)
            if 0.74 <= j < 0.86 and abs(j - 0.8) > 1e-9:
                docs.append(cand)
                planted.append((i, len(docs) - 1, j))
                break
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": t} for t in docs])
    # 42 bands of 3 rows: every planted pair (J >= 0.74) is a candidate (P > 1 - 1e-9), so only the
    # verification decides
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl"), segment_dedup=False, write=False,
                            bands=42, rows=3))
    roots = res["roots"]
    above = [r for r in planted if r[2] >= 0.8]
    below = [r for r in planted if r[2] < 0.8]
    assert above and below
    assert all(roots[i] == roots[k] for i, k, _ in above)
    assert all(roots[i] != roots[k] for i, k, _ in below)


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
    assert res["stats"]["totals"]["dropped"]["segment_emptied"]["docs"] == 1
    # under the count threshold nothing is removed
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web"), segment_min_docs=100, near_dedup=False))
    assert res["stats"]["totals"]["segment_lines_removed"] == 0


def test_a_copied_document_keeps_its_content_and_boilerplate_still_goes(tmp_path):
    """30 exact copies of a 6-paragraph story (its paragraphs are in 30 documents, over
    segment_min_docs) plus 25 pages sharing two real boilerplate lines: one copy survives, whole;
    the boilerplate leaves every survivor."""
    banner = "Share this article on Facebook, Twitter and LinkedIn today."
    cookie = "We use cookies to improve your experience on our website."
    story = "\n".join(prose(500 + k, 60) for k in range(6))
    docs = [story] * 30 + [prose(600 + i) + "\n" + banner + "\n" + cookie for i in range(25)]
    docs += [story + "\n" + banner]  # a near copy that also has boilerplate
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": t} for t in docs])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl"), segment_min_docs=20))
    out = [r["text"] for r in read_out(str(tmp_path / "out"), "web")]
    assert out.count(story) == 1 and len(out) == 26
    assert not any(banner in t or cookie in t for t in out)
    # the longest copy (the one with the banner) is the one kept; its banner goes too
    assert res["stats"]["near_dup"]["exact_copies"] == 29 and res["stats"]["totals"]["segment_lines_removed"] == 51
    assert res["stats"]["totals"]["dropped"]["segment_emptied"]["docs"] == 0


def test_line_counter_memory_scales_with_the_corpus(tmp_path):
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": prose(i)} for i in range(300)])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl"), segment_sketch_mb=256))
    assert res["stats"]["segment_sketch_mb"] <= 0.05  # 300 documents: kilobytes, not the 256 MB cap
    small = dedup.CountMinSketch(256, items=3000)
    assert small.table.nbytes == 2 * 4096 * 4 and dedup.CountMinSketch(1, items=10**9).table.nbytes <= 2**20


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
    with pytest.raises(SystemExit, match="no eval set found.*--decontaminate=false"):
        dedup.resolve_eval_files(cfg, hub=OfflineHub())


def test_eval_items_are_indexed_per_field(tmp_path):
    (tmp_path / "m.csv").write_text('"What is two plus two?",3,4,5,6,B\n')
    (tmp_path / "s.json").write_text(json.dumps([{"question": "Why is the sky blue?", "correct_answer": "scattering",
                                                   "support": "Rayleigh scattering of sunlight by air"}]))
    assert list(benchmarks.eval_item_texts([str(tmp_path / "m.csv")])) == [
        ["What is two plus two?"] + [f"What is two plus two? {x}" for x in (3, 4, 5, 6)]]
    assert list(benchmarks.eval_item_texts([str(tmp_path / "s.json")])) == [
        ["Why is the sky blue?", "Why is the sky blue? scattering", "Rayleigh scattering of sunlight by air"]]
    wino = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah",
            "option2": "Maria", "answer": "2"}
    assert benchmarks.item_texts(wino) == ["Sarah was a better surgeon than Maria so Sarah got the easier cases.",
                                      "Sarah was a better surgeon than Maria so Maria got the easier cases."]
    assert benchmarks.item_texts({"context": "He looked at the", "continuation": "sky"}) == ["He looked at the sky"]
    arc = {"question": {"stem": "Which is a gas?", "choices": [{"text": "air", "label": "A"}, {"text": "rock"}]}}
    assert benchmarks.item_texts(arc) == ["Which is a gas?", "Which is a gas? air", "Which is a gas? rock"]
    boolq = {"query": "Passage: The sky is blue by day.\nQuestion: is the sky blue?", "choices": ["no", "yes"]}
    assert benchmarks.item_texts(boolq) == ["is the sky blue?", "is the sky blue? no", "is the sky blue? yes",
                                       "The sky is blue by day."]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"question": ["a b"], "choices": [["c", "d"]], "answer": [1]}), tmp_path / "e.parquet")
    assert list(benchmarks.eval_item_texts([str(tmp_path / "e.parquet")])) == [["a b", "a b c", "a b d"]]
    # dedup.py decontaminates against the benchmark registry itself: LAMBADA and PIQA's test split are in it
    assert dedup.EVAL_SETS is benchmarks.EVAL_SETS
    assert "lambada_openai" in dedup.EVAL_SETS and "piqa/tests.jsonl" in dedup.EVAL_SETS["piqa"][0]


def test_short_items_are_caught_whole_and_filled_blanks_too(tmp_path):
    """An item shorter than 13 words is caught when its whole text appears (curly quotes or not);
    a common phrase below eval_min_words is not indexed; WinoGrande's sentence is indexed with the
    blank filled, so the completed sentence is caught."""
    q = "Which organ pumps the blood through the human body?"  # 9 words
    write_jsonl(str(tmp_path / "evals" / "mini.jsonl"),
                [{"question": q, "choices": ["heart", "lung"]}, {"question": "What is it?", "choices": ["x"]}])
    write_jsonl(str(tmp_path / "evals" / "wino.jsonl"),
                [{"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                  "option1": "Sarah", "option2": "Maria", "answer": "2"}])
    docs = [prose(0) + "\nQuiz: " + q.replace("the blood", "the \u201cblood\u201d") + " Answer: heart.",  # leaked, curled
            prose(1) + "\nWhat is it? Nobody knew.",  # 3 words: not indexed
            prose(2) + "\nSarah was a much better surgeon than Maria so Maria always got the easier cases.",
            prose(3) + "\nWhich organ pumps the blood?"]  # part of the question only
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": t} for t in docs])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl"), decontaminate=True,
                            evals=f"{tmp_path / 'evals' / 'mini.jsonl'},{tmp_path / 'evals' / 'wino.jsonl'}"))
    assert res["contaminated"].tolist() == [0, -1, 1, -1]
    assert res["stats"]["decontaminated_by_eval"] == {"mini.jsonl": 1, "wino.jsonl": 1}


def test_curled_and_straight_quote_variants_are_one_text(tmp_path):
    straight = prose(7) + '\nShe said "don\'t go" -- and left... It was 1990-2000.'
    curled = prose(7) + "\nShe said \u201cdon\u2019t go\u201d \u2014 and left\u2026 It was 1990\u20132000."
    assert normalize_words(straight) == normalize_words(curled)
    assert normalize_words("Caf\u00e9 \uff21\uff22 \ufb01ne na\u00efve") == [b"caf\xc3\xa9", b"ab", b"fine", b"na\xc3\xafve"]
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": straight}, {"text": curled}, {"text": prose(8)}])
    res = dedup.run(cfg_for(tmp_path, str(tmp_path / "in" / "web.jsonl"), segment_dedup=False, write=False))
    assert res["roots"].tolist() == [0, 0, 2] and res["stats"]["near_dup"]["exact_copies"] == 1


def test_offline_without_local_eval_sets_fails_at_once(tmp_path, monkeypatch):
    import time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_for(tmp_path, "x", decontaminate=True, evals="default", eval_dir=str(tmp_path / "none"))
    t0 = time.time()
    with pytest.raises(SystemExit, match="no eval set found.*Hub is unreachable.*--eval_dir"):
        dedup.resolve_eval_files(cfg)
    assert time.time() - t0 < 5


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "gsm8k", "test.jsonl")), reason="shared data not present")
def test_real_eval_sets_decontaminate_a_leaked_gsm8k_question(tmp_path):
    cfg = cfg_for(tmp_path, str(tmp_path / "in"), decontaminate=True, evals="gsm8k,arc_easy,mmlu,hellaswag",
                  eval_dir=SHARED)
    files = dedup.resolve_eval_files(cfg)
    assert set(files) == {"gsm8k", "arc_easy", "mmlu", "hellaswag"} and len(files["mmlu"]) == 57
    everything = dedup.resolve_eval_files(cfg_for(tmp_path, "x", evals="default", eval_dir=SHARED))
    assert set(everything) == set(dedup.EVAL_SETS) and len(everything["piqa"]) == 2
    q = json.loads(open(os.path.join(SHARED, "gsm8k", "test.jsonl")).readline())["question"]
    write_jsonl(str(tmp_path / "in" / "web.jsonl"), [{"text": prose(0) + "\n" + q}, {"text": prose(1)}])
    res = dedup.run(cfg)
    assert res["stats"]["decontaminated_by_eval"]["gsm8k"] == 1
    assert res["stats"]["totals"]["docs_out"] == 1
