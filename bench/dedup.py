"""
Benchmark of dedup.py: near-duplicate recall and precision, decontamination recall and false
positives, speed, on a synthetic corpus and on a real-text corpus built from ../shared/data.

    python bench/dedup.py                                   # both corpora, this checkout's dedup.py
    python bench/dedup.py --compare_dir=/tmp/nanoforge_main # ... and another checkout's, side by side
    python bench/dedup.py --docs=20000 --real=false

Synthetic corpus: Zipf-distributed words from a made-up vocabulary, in sentences and paragraphs
(~1 KB). 10% of the documents are copies of others with k random word edits (k uniform in
0..max_edits), so their word 5-gram Jaccard spreads from 1.0 down to ~0.4.

Real-text corpus (skipped without ../shared/data): TinyStories stories, Tiny Shakespeare scenes,
GSM8K train problems, ARC train/dev questions, MMLU dev/val questions, SciQ validation support
passages -- none of them indexed for decontamination. Planted: near copies with random word edits,
exact copies, typographic variants (quotes curled, dashes and ellipses typeset: the same text), and
contaminated documents: a clean host document with one eval item's text inserted (question + the
correct answer, WinoGrande's sentence filled, LAMBADA's passage, a BoolQ passage...), a third of them
with curled quotes; "short" items are those under 13 words.

Every Jaccard is computed here with a reference word splitter written independently of data.py, on
the exact shingle sets. Reported per corpus: recall of planted pairs by Jaccard bucket (0.7-0.8,
0.8-0.85, 0.85-0.9, 0.9-1.0, exact copies, typographic variants), strict precision (pairs put in one
cluster whose Jaccard >= threshold), removal precision (removed documents whose Jaccard to the kept
document of their cluster >= threshold); decontamination recall per eval set (all / short items) and
false positives on clean documents per eval set (training-split documents that begin with a test
question word for word, `cross_split_copies`, are real contamination and counted apart). Speed: documents per CPU-second end to end (reading
the JSONL, shingling, signatures, LSH, verification, clustering) on the synthetic corpus, with the
naive datasketch loop (MinHash.update per shingle) and MinHash.bulk timed in the same run.

--compare_dir runs the same measurements with another checkout's dedup.py (a subprocess with that
checkout first on sys.path) on the same corpora, so "before" and "after" come from one run.
Results go to out/bench_dedup/results.json.
"""
import csv
import glob
import json
import os
import re
import resource
import subprocess
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")

TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "-", "\u2026": "..."})
WORD = re.compile(r"[^\W_]+")
# clean sources that are prose; the others (GSM8K train, ARC train/dev, MMLU dev/val) are eval-set
# training splits that share templates and whole questions with the test splits
PROSE_SOURCES = ["tinystories", "shakespeare", "sciq_valid"]
BUCKETS = [("0.70-0.80", 0.7, 0.8), ("0.80-0.85", 0.8, 0.85), ("0.85-0.90", 0.85, 0.9), ("0.90-1.00", 0.9, 1.0)]


@dataclass
class BenchConfig:
    docs: int = 100_000           # synthetic corpus size
    dup_fraction: float = 0.10
    doc_words: int = 165          # ~1 KB of text per document
    vocab: int = 50_000
    max_edits: int = 14
    threshold: float = 0.8
    num_perm: int = 128
    workers: int = 0              # 0 = all cores
    naive_docs: int = 1000        # documents timed with the naive per-shingle loop
    synthetic: bool = True
    real: bool = True             # the real-text corpus from shared_dir (skipped where absent)
    shared_dir: str = SHARED
    real_near_fraction: float = 0.25  # originals that get a near copy
    leaks_per_set: int = 40       # contaminated documents per eval set
    code_dir: str = REPO          # whose dedup.py to measure
    compare_dir: str = ""         # another checkout measured side by side (its bench numbers under "compare")
    out_dir: str = "out/bench_dedup"
    seed: int = 0
    result_file: str = ""         # internal: where the --compare_dir subprocess writes its results


def make_vocab(rng, n):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lens = np.clip(rng.poisson(4.5, n), 1, 14)
    return sorted({"".join(rng.choice(letters, l)) for l in lens})


def make_document(rng, words):
    out, i = [], 0
    while i < len(words):  # sentences of 6-20 words, paragraphs of 2-5 sentences
        k = int(rng.integers(6, 21))
        s = words[i:i + k]
        out.append(s[0].capitalize() + " " + " ".join(s[1:]) + ".")
        i += k
    paras, j = [], 0
    while j < len(out):
        k = int(rng.integers(2, 6))
        paras.append(" ".join(out[j:j + k]))
        j += k
    return "\n".join(paras)


def edit_document(rng, text, vocab, k):
    words = text.split(" ")
    for _ in range(k):
        op, pos = rng.integers(3), int(rng.integers(len(words)))
        w = vocab[int(rng.integers(len(vocab)))]
        if op == 0:
            words[pos] = w
        elif op == 1:
            words.insert(pos, w)
        elif len(words) > 10:
            del words[pos]
    return " ".join(words)


def ref_words(text):
    """The reference word splitter, written independently of data.py: NFKC, typographic quotes / dashes /
    ellipsis as ASCII, lowercase, runs of Unicode letters and digits."""
    text = unicodedata.normalize("NFKC", text.translate(TYPOGRAPHIC)).lower()
    return WORD.findall(text)


def shingle_set(text, n=5):
    w = ref_words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} or {tuple(w)}


def jaccard(a, b):
    return len(a & b) / max(len(a | b), 1)


def make_corpus(cfg, corpus_dir):
    """The synthetic corpus: Zipf words, 10% planted copies with 0..max_edits word edits."""
    rng = np.random.default_rng(cfg.seed)
    vocab = make_vocab(rng, cfg.vocab)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    n_dup = int(cfg.docs * cfg.dup_fraction)
    n_orig = cfg.docs - n_dup
    lens = rng.integers(cfg.doc_words * 3 // 4, cfg.doc_words * 5 // 4, n_orig)
    all_words = np.array(vocab, dtype=object)[rng.choice(len(vocab), size=int(lens.sum()), p=p)].tolist()
    ends = np.cumsum(lens)
    texts = [make_document(rng, all_words[e - l:e]) for e, l in zip(ends, lens)]
    family = list(range(n_orig))  # family id = index of the original
    for _ in range(n_dup):
        src = int(rng.integers(n_orig))
        texts.append(edit_document(rng, texts[src], vocab, int(rng.integers(0, cfg.max_edits + 1))))
        family.append(src)
    perm = rng.permutation(cfg.docs)  # copies are not next to their originals
    texts = [texts[i] for i in perm]
    family = np.array(family)[perm]
    os.makedirs(corpus_dir, exist_ok=True)
    for f in os.listdir(corpus_dir):
        os.remove(os.path.join(corpus_dir, f))
    per_file = (cfg.docs + 3) // 4
    for k in range(4):
        with open(os.path.join(corpus_dir, f"part_{k}.jsonl"), "w") as f:
            for i in range(k * per_file, min((k + 1) * per_file, cfg.docs)):
                f.write(json.dumps({"id": i, "text": texts[i]}) + "\n")
    return texts, family


def cached_corpus(cfg, corpus_dir):
    """Make the corpus and its truth, or reuse them when an earlier run made them with the same settings."""
    key = {k: getattr(cfg, k) for k in ("docs", "dup_fraction", "doc_words", "vocab", "max_edits", "seed")}
    key["words"] = "reference-unicode-1"
    cache = os.path.join(cfg.out_dir, "truth.npz")
    if os.path.exists(cache):
        z = np.load(cache, allow_pickle=False)
        if json.loads(str(z["key"])) == key:
            texts = [json.loads(l)["text"] for k in range(4) for l in open(os.path.join(corpus_dir, f"part_{k}.jsonl"))]
            return texts, z["family"], z["truth"], z["truth_j"]
    texts, family = make_corpus(cfg, corpus_dir)
    truth, truth_j = planted_pairs(texts, family)
    np.savez(cache, key=json.dumps(key), family=family, truth=truth, truth_j=truth_j)
    return texts, family, truth, truth_j


def planted_pairs(texts, family):
    """Every pair inside a family, with its exact shingle Jaccard."""
    order = np.argsort(family, kind="stable")
    f = family[order]
    bounds = np.flatnonzero(np.concatenate([[True], f[1:] != f[:-1], [True]]))
    pairs, jac = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        members = order[s:e]
        if len(members) < 2:
            continue
        sets = {int(m): shingle_set(texts[m]) for m in members}
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = sorted((int(members[a]), int(members[b])))
                pairs.append((i, j))
                jac.append(jaccard(sets[i], sets[j]))
    return np.array(pairs), np.array(jac)


def cluster_pairs(roots):
    """All pairs of documents that ended up in the same cluster."""
    order = np.argsort(roots, kind="stable")
    r = roots[order]
    bounds = np.flatnonzero(np.concatenate([[True], r[1:] != r[:-1], [True]]))
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        m = np.sort(order[s:e])
        out += [(int(m[a]), int(m[b])) for a in range(len(m)) for b in range(a + 1, len(m))]
    return out


def naive_minhash_rate(texts, num_perm):
    """The loop one writes first: shingle in Python, MinHash.update once per shingle."""
    from datasketch import MinHash
    t0, c0 = time.perf_counter(), time.process_time()
    for text in texts:
        w = text.lower().split()
        m = MinHash(num_perm=num_perm)
        for i in range(len(w) - 4):
            m.update(" ".join(w[i:i + 5]).encode())
    return len(texts) / (time.perf_counter() - t0), len(texts) / (time.process_time() - c0)


def bulk_minhash_rate(texts, num_perm):
    from datasketch import MinHash
    t0, c0 = time.perf_counter(), time.process_time()
    shingles = []
    for text in texts:
        w = text.lower().split()
        shingles.append([" ".join(w[i:i + 5]).encode() for i in range(len(w) - 4)])
    MinHash.bulk(shingles, num_perm=num_perm)
    return len(texts) / (time.perf_counter() - t0), len(texts) / (time.process_time() - c0)


def curl(text):
    """Typeset a text: curly quotes and apostrophes, em dashes, an ellipsis character."""
    out, dq = [], False
    for i, ch in enumerate(text):
        if ch == '"':
            out.append("\u201d" if dq else "\u201c")
            dq = not dq
        elif ch == "'":
            out.append("\u2019" if i and text[i - 1].isalnum() else "\u2018")
        else:
            out.append(ch)
    return "".join(out).replace(" -- ", " \u2014 ").replace("...", "\u2026")


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def clean_documents(shared):
    """(source, text) of documents that no eval set indexes."""
    docs = []
    stories = open(os.path.join(shared, "tinystories", "tinystories_sample.txt"), encoding="utf-8").read()
    docs += [("tinystories", t.strip()) for t in stories.split("<|endoftext|>")[:-1] if len(t.split()) >= 30]
    lines = open(os.path.join(shared, "tinyshakespeare", "input.txt"), encoding="utf-8").read().split("\n\n")
    docs += [("shakespeare", "\n\n".join(lines[i:i + 6])) for i in range(0, len(lines), 6)]
    docs += [("gsm8k_train", r["question"] + "\n" + r["answer"])
             for r in jsonl(os.path.join(shared, "gsm8k", "train.jsonl"))]
    for f in sorted(glob.glob(os.path.join(shared, "arc_*", "ARC-*-Train.jsonl")) +
                    glob.glob(os.path.join(shared, "arc_*", "ARC-*-Dev.jsonl"))):
        docs += [("arc_train", r["question"]["stem"] + " " + " ".join(c["text"] for c in r["question"]["choices"]))
                 for r in jsonl(f)]
    for f in sorted(glob.glob(os.path.join(shared, "mmlu", "dev", "*.csv")) + glob.glob(os.path.join(shared, "mmlu", "val", "*.csv"))):
        with open(f, newline="", encoding="utf-8") as fh:
            docs += [("mmlu_dev", " ".join(row[:5])) for row in csv.reader(fh)]
    docs += [("sciq_valid", r["support"]) for r in json.load(open(os.path.join(shared, "sciq", "valid.json")))
             if len(r["support"].split()) >= 30]
    return docs


def leak_texts(shared):
    """{eval set: [the text a leak of one item would copy]}, read here independently of dedup.py."""
    def labels(path):
        return [int(x) for x in open(path).read().split()]
    out = {}
    out["gsm8k"] = [r["question"] + "\n" + r["answer"] for r in jsonl(os.path.join(shared, "gsm8k", "test.jsonl"))]
    for name, f in (("arc_easy", "arc_easy/ARC-Easy-Test.jsonl"), ("arc_challenge", "arc_challenge/ARC-Challenge-Test.jsonl")):
        rows = jsonl(os.path.join(shared, f))
        out[name] = [r["question"]["stem"] + " " + next(c["text"] for c in r["question"]["choices"]
                                                         if c["label"] == r["answerKey"]) for r in rows]
    out["hellaswag"] = [r["ctx"] + " " + r["endings"][int(r["label"])]
                        for r in jsonl(glob.glob(os.path.join(shared, "hellaswag", "*.jsonl"))[0])]
    mmlu = []
    for f in sorted(glob.glob(os.path.join(shared, "mmlu", "test", "*.csv"))):
        with open(f, newline="", encoding="utf-8") as fh:
            mmlu += [row[0] + " " + row[1 + "ABCD".index(row[5])] for row in csv.reader(fh)]
    out["mmlu"] = mmlu
    piqa = jsonl(os.path.join(shared, "piqa", "valid.jsonl"))
    out["piqa"] = [r["goal"] + " " + r["sol1" if y == 0 else "sol2"]
                   for r, y in zip(piqa, labels(os.path.join(shared, "piqa", "valid-labels.lst")))]
    out["piqa_test"] = [r["goal"] + " " + r["sol1"] for r in jsonl(os.path.join(shared, "piqa", "tests.jsonl"))]
    out["winogrande"] = [r["sentence"].replace("_", r["option" + r["answer"]])
                         for r in jsonl(os.path.join(shared, "winogrande", "dev.jsonl"))]
    out["openbookqa"] = [r["query"] + " " + r["choices"][r["gold"]]
                         for r in jsonl(os.path.join(shared, "openbookqa", "openbook_qa.llmfoundry.jsonl"))]
    out["boolq"] = [r["query"].split("\nQuestion: ")[0][len("Passage: "):]
                    for r in jsonl(os.path.join(shared, "boolq", "boolq.llmfoundry.jsonl"))]
    out["sciq"] = [r["question"] + " " + r["correct_answer"] for r in json.load(open(os.path.join(shared, "sciq", "test.json")))]
    out["commonsenseqa"] = [r["question"] + " " + r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
                            for r in jsonl(os.path.join(shared, "commonsenseqa", "dev_rand_split.jsonl"))]
    out["siqa"] = [r["context"] + " " + r["question"] + " " + r["answer"]
                   for r in jsonl(os.path.join(shared, "siqa", "dev.jsonl"))]
    out["lambada_openai"] = [r["context"] + " " + r["continuation"]
                      for r in jsonl(os.path.join(shared, "lambada_openai", "lambada_openai.llmfoundry.jsonl"))]
    return out


def cross_split_copies(texts, source, shared):
    """Documents of the eval sets' training splits (GSM8K train, ARC train/dev, MMLU dev/val) that begin
    with a test question word for word: real contamination that the split names hide (ARC repeats
    some questions across splits). Decontamination is right to flag them, so they are counted apart
    from the false positives."""
    def key(text):
        return " ".join(ref_words(text))
    questions = [r["question"] for r in jsonl(os.path.join(shared, "gsm8k", "test.jsonl"))]
    for f in sorted(glob.glob(os.path.join(shared, "arc_*", "ARC-*-Test.jsonl"))):
        questions += [r["question"]["stem"] for r in jsonl(f)]
    for f in sorted(glob.glob(os.path.join(shared, "mmlu", "test", "*.csv"))):
        with open(f, newline="", encoding="utf-8") as fh:
            questions += [row[0] for row in csv.reader(fh)]
    by_head = {}
    for q in questions:
        k = key(q)
        if len(k.split()) >= 4:
            by_head.setdefault(" ".join(k.split()[:4]), []).append(k)
    out = np.zeros(len(texts), dtype=bool)
    for i, (t, s) in enumerate(zip(texts, source)):
        if s in ("gsm8k_train", "arc_train", "mmlu_dev"):
            k = key(t)
            out[i] = any(k == q or k.startswith(q + " ") for q in by_head.get(" ".join(k.split()[:4]), ()))
    return out


def make_real_corpus(cfg, corpus_dir):
    """Writes corpus_dir/real.jsonl; returns the texts and the truth: family (original index) per
    document, kind per document ('original', 'near', 'exact', 'typo', 'leak', 'host'), the eval set and
    short flag of each leak."""
    rng = np.random.default_rng(cfg.seed + 1)
    docs = clean_documents(cfg.shared_dir)
    order = rng.permutation(len(docs))
    hosts_idx, orig_idx = order[:cfg.leaks_per_set * 15], order[cfg.leaks_per_set * 15:]
    texts = [docs[i][1] for i in orig_idx]
    source = [docs[i][0] for i in orig_idx]
    n_orig = len(texts)
    family, kind, leak_set, leak_short = list(range(n_orig)), ["original"] * n_orig, [""] * n_orig, [False] * n_orig
    vocab = sorted({w for t in texts[:2000] for w in t.split()})
    for i in rng.choice(n_orig, int(cfg.real_near_fraction * n_orig), replace=False):
        n_w = len(texts[i].split())
        k = int(rng.integers(1, max(2, n_w // 12)))  # J spreads from ~1 down to ~0.5
        texts.append(edit_document(rng, texts[i], vocab, k))
        family.append(int(i)), kind.append("near"), leak_set.append(""), leak_short.append(False)
        source.append(source[i])
    for i in rng.choice(n_orig, int(0.03 * n_orig), replace=False):
        texts.append(texts[i])
        family.append(int(i)), kind.append("exact"), leak_set.append(""), leak_short.append(False)
        source.append(source[i])
    typo = [i for i in rng.permutation(n_orig) if curl(texts[i]) != texts[i]][:int(0.03 * n_orig)]
    for i in typo:
        texts.append(curl(texts[i]))
        family.append(int(i)), kind.append("typo"), leak_set.append(""), leak_short.append(False)
        source.append(source[i])
    leaks = leak_texts(cfg.shared_dir)
    h = 0
    for name, items in leaks.items():
        for j in rng.choice(len(items), min(cfg.leaks_per_set, len(items)), replace=False):
            item = items[j]
            if h % 3 == 0:
                item = curl(item)
            host = docs[hosts_idx[h % len(hosts_idx)]][1]
            source.append(docs[hosts_idx[h % len(hosts_idx)]][0])
            paras = host.split("\n")
            cut = int(rng.integers(0, len(paras) + 1))
            texts.append("\n".join(paras[:cut] + [item] + paras[cut:]))
            family.append(len(texts) - 1), kind.append("leak"), leak_set.append(name)
            leak_short.append(len(ref_words(item)) < 13)
            h += 1
    perm = rng.permutation(len(texts))
    inv = np.argsort(perm)
    texts = [texts[i] for i in perm]
    family = inv[np.array(family)[perm]]  # family = position of the original in the shuffled corpus
    kind, leak_set, leak_short, source = [np.array(x)[perm] for x in (kind, leak_set, leak_short, source)]
    os.makedirs(corpus_dir, exist_ok=True)
    with open(os.path.join(corpus_dir, "real.jsonl"), "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts, family, kind, leak_set, leak_short, source


def near_dup_quality(texts, family, roots, keep, truth, truth_j, threshold, kinds=None):
    """Recall by bucket, strict precision over the pairs put in one cluster, removal precision."""
    found = cluster_pairs(roots)
    found_set = set(found)
    hit = np.array([(int(i), int(j)) in found_set for i, j in truth], dtype=bool)
    jac_of = {(int(i), int(j)): x for (i, j), x in zip(truth, truth_j)}
    cache = {}

    def jac(i, j):
        if (i, j) in jac_of:
            return jac_of[(i, j)]
        for k in (i, j):
            if k not in cache:
                cache[k] = shingle_set(texts[k])
        return jaccard(cache[i], cache[j])
    exact = np.array([jac(i, j) for i, j in found]) if found else np.zeros(0)
    recall = {}
    for name, lo, hi in BUCKETS:
        sel = (truth_j >= lo) & (truth_j < hi) if hi < 1.0 else (truth_j >= lo) & (truth_j < 1.0)
        recall[name] = {"pairs": int(sel.sum()), "recall": round(float(hit[sel].mean()), 4) if sel.any() else None}
    sel = truth_j >= 1.0
    if kinds is not None:
        typo = np.array([kinds[j] == "typo" or kinds[i] == "typo" for i, j in truth], dtype=bool)
        recall["exact copies"] = {"pairs": int((sel & ~typo).sum()), "recall": round(float(hit[sel & ~typo].mean()), 4)}
        recall["typographic variants"] = {"pairs": int((sel & typo).sum()), "recall": round(float(hit[sel & typo].mean()), 4)}
    else:
        recall["exact copies"] = {"pairs": int(sel.sum()), "recall": round(float(hit[sel].mean()), 4) if sel.any() else None}
    # removal precision: each removed document against the kept document of its cluster
    kept_of = {int(r): int(i) for i, r in enumerate(roots) if keep[i]}
    removed = [i for i in range(len(roots)) if not keep[i] and int(roots[i]) in kept_of and kept_of[int(roots[i])] != i]
    good = [jac(*sorted((i, kept_of[int(roots[i])]))) >= threshold for i in removed]
    return {"recall_by_jaccard": recall,
            "strict_precision": round(float((exact >= threshold).mean()), 4) if found else 1.0,
            "removal_precision": round(float(np.mean(good)), 4) if good else 1.0,
            "removed": len(removed), "found_pairs": len(found), "planted_pairs": int(len(truth))}


def run_dedup(dedup, inputs, out_dir, cfg, **kw):
    fields = set(dedup.DedupConfig.__dataclass_fields__)
    args = dict(inputs=inputs, out_dir=out_dir, threshold=cfg.threshold, num_perm=cfg.num_perm, workers=cfg.workers)
    args.update({k: v for k, v in kw.items() if k in fields})
    return dedup.run(dedup.DedupConfig(**args))


def measure(cfg):
    """Everything measured with the dedup.py of cfg.code_dir. Returns the results dict."""
    sys.path.insert(0, os.path.abspath(cfg.code_dir))
    import dedup
    cores = num_workers(cfg.workers)
    results = {"code_dir": os.path.abspath(cfg.code_dir), "cores": cores}
    if cfg.synthetic:
        corpus_dir = os.path.join(cfg.out_dir, "corpus")
        texts, family, truth, truth_j = cached_corpus(cfg, corpus_dir)
        # the timed run: near-duplicates only, nothing written, so the figure is reading -> clusters
        res = run_dedup(dedup, corpus_dir, os.path.join(cfg.out_dir, "run_synthetic"), cfg, decontaminate=False,
                        segment_dedup=False, write=False)
        st = res["stats"]
        q = near_dup_quality(texts, family, res["roots"], res["keep"], truth, truth_j, cfg.threshold)
        rng = np.random.default_rng(1)
        sample = [texts[i] for i in rng.choice(len(texts), cfg.naive_docs, replace=False)]
        naive, bulk = naive_minhash_rate(sample, cfg.num_perm), bulk_minhash_rate(sample, cfg.num_perm)
        results["synthetic"] = {
            "docs": len(texts), **q, "end_to_end_s": st["timings_s"]["total"], "timings_s": st["timings_s"],
            "docs_per_s": round(len(texts) / st["timings_s"]["total"], 1),
            "docs_per_cpu_s": round(len(texts) / st["cpu_s"], 1),
            "naive_update_loop_docs_per_cpu_s": round(naive[1], 1), "datasketch_bulk_docs_per_cpu_s": round(bulk[1], 1),
            "speedup_per_cpu_s_vs_naive": round(len(texts) / st["cpu_s"] / naive[1], 1),
            "near_dup": st["near_dup"], "lsh": st["lsh"], "load_average_1min": os.getloadavg()[0]}
    if cfg.real and os.path.isdir(cfg.shared_dir):
        corpus_dir = os.path.join(cfg.out_dir, "real_corpus")
        texts, family, kind, leak_set, leak_short, source = cached_real_corpus(cfg, corpus_dir)
        truth, truth_j = planted_pairs(texts, family)
        inputs = os.path.join(corpus_dir, "real.jsonl")
        res = run_dedup(dedup, inputs, os.path.join(cfg.out_dir, "run_real"), cfg, decontaminate=False,
                        segment_dedup=False, write=False)
        q = near_dup_quality(texts, family, res["roots"], res["keep"], truth, truth_j, cfg.threshold, kinds=kind)
        dres = run_dedup(dedup, inputs, os.path.join(cfg.out_dir, "run_real_decon"), cfg, near_dedup=False,
                         segment_dedup=False, write=False, decontaminate=True, evals="default",
                         eval_dir=cfg.shared_dir)
        flagged = ~dres["keep"]
        is_leak = kind == "leak"
        by_set = {}
        for name in sorted(set(leak_set[is_leak])):
            sel = is_leak & (leak_set == name)
            short = sel & leak_short
            by_set[name] = {"leaks": int(sel.sum()), "recall": round(float(flagged[sel].mean()), 4),
                            "short_leaks": int(short.sum()),
                            "short_recall": round(float(flagged[short].mean()), 4) if short.any() else None}
        copies = cross_split_copies(texts, source, cfg.shared_dir) & ~is_leak
        clean = ~is_leak & ~copies
        prose = clean & np.isin(source, PROSE_SOURCES)
        fp_by_source = {s: {"docs": int((clean & (source == s)).sum()), "flagged": int((flagged & clean & (source == s)).sum())}
                        for s in sorted(set(source))}
        # which eval set flagged the clean documents (the stats count every flagged document; the leaks
        # of each set are subtracted)
        fp_by_set = {k: v - int((is_leak & flagged & (np.char.replace(leak_set.astype(str), "piqa_test", "piqa") == k)).sum())
                     for k, v in dres["stats"]["decontaminated_by_eval"].items()}
        results["real"] = {
            "docs": len(texts), "kinds": {k: int((kind == k).sum()) for k in sorted(set(kind))}, **q,
            "decontamination": {
                "recall_all": round(float(flagged[is_leak].mean()), 4),
                "recall_short_items": round(float(flagged[is_leak & leak_short].mean()), 4),
                "false_positive_rate_prose_docs": round(float(flagged[prose].mean()), 5),
                "false_positive_rate_all_clean_docs": round(float(flagged[clean].mean()), 5),
                "false_positives": int(flagged[clean].sum()), "clean_docs": int(clean.sum()),
                "cross_split_copies": int(copies.sum()), "cross_split_copies_flagged": int(flagged[copies].sum()),
                "flagged_clean_by_source": fp_by_source, "flagged_clean_by_eval_set": fp_by_set,
                "recall_by_eval_set": by_set},
            "docs_per_cpu_s": round(len(texts) / res["stats"]["cpu_s"], 1),
            "near_dup": res["stats"]["near_dup"]}
    return results


def cached_real_corpus(cfg, corpus_dir):
    key = {k: getattr(cfg, k) for k in ("seed", "real_near_fraction", "leaks_per_set", "shared_dir")}
    key["version"] = 2
    cache = os.path.join(corpus_dir, "truth.json")
    if os.path.exists(cache):
        z = json.load(open(cache))
        if z["key"] == key:
            texts = [json.loads(l)["text"] for l in open(os.path.join(corpus_dir, "real.jsonl"))]
            return (texts, np.array(z["family"]), np.array(z["kind"]), np.array(z["leak_set"]),
                    np.array(z["leak_short"], dtype=bool), np.array(z["source"]))
    texts, family, kind, leak_set, leak_short, source = make_real_corpus(cfg, corpus_dir)
    with open(cache, "w") as f:
        json.dump({"key": key, "family": family.tolist(), "kind": kind.tolist(), "leak_set": leak_set.tolist(),
                   "leak_short": leak_short.tolist(), "source": source.tolist()}, f)
    return texts, family, kind, leak_set, leak_short, source


def num_workers(n):
    return n if n > 0 else (os.cpu_count() or 1)


def main(argv):
    sys.path.insert(0, REPO)
    from common import parse_config
    cfg = parse_config(BenchConfig(), argv)  # cfg.code_dir goes first on sys.path in measure()
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = {"config": asdict(cfg), "this": measure(cfg)}
    if cfg.compare_dir:  # the other checkout, same corpora (cached), one process of its own
        out = os.path.join(cfg.out_dir, "compare.json")
        cmd = [sys.executable, os.path.abspath(__file__), f"--code_dir={cfg.compare_dir}", f"--out_dir={cfg.out_dir}",
               f"--result_file={out}"] + [a for a in argv if not a.startswith(("--compare_dir", "--code_dir", "--out_dir"))]
        subprocess.run(cmd, check=True)
        results["compare"] = json.load(open(out))
    with open(cfg.result_file or os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results["this"] if cfg.result_file else results, f, indent=1)
    print(json.dumps(results, indent=1))
    this = results["this"]
    if "synthetic" in this:
        s = this["synthetic"]
        print(f"synthetic: {s['docs_per_cpu_s']:.0f} docs per CPU-second (target >= 5000), "
              f"{s['speedup_per_cpu_s_vs_naive']}x the naive datasketch loop")


if __name__ == "__main__":
    main(sys.argv[1:])
