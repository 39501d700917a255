"""
Benchmark of dedup.py's near-duplicate search on a synthetic corpus with planted duplicates.

    python bench/dedup.py                      # 100k documents of ~1 KB, 10% planted near-duplicates
    python bench/dedup.py --docs=20000 --full_run=false

The corpus: Zipf-distributed words from a made-up vocabulary, in sentences and paragraphs (~1 KB).
10% of the documents are copies of others with k random word edits (substitute / insert / delete,
k uniform in 0..max_edits), so their word 5-gram Jaccard similarity spreads from 1.0 down to ~0.4;
an original can get several copies (a family). The exact Jaccard of every planted pair is measured.

Reported: documents/s per core end to end (reading the JSONL, shingling, signatures, LSH, verifying,
clustering), peak memory, precision (found pairs that are planted duplicates) and recall of planted
pairs by Jaccard, against a naive datasketch loop (MinHash.update per shingle, shingling included)
and MinHash.bulk timed in the same run. Results go to out/bench_dedup/results.json.
"""
import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dedup  # noqa: E402
from data import normalize_words, parse_cli  # noqa: E402


@dataclass
class BenchConfig:
    docs: int = 100_000
    dup_fraction: float = 0.10
    doc_words: int = 165          # ~1 KB of text per document
    vocab: int = 50_000
    max_edits: int = 14
    threshold: float = 0.8
    num_perm: int = 128
    workers: int = 0              # 0 = all cores
    naive_docs: int = 1000        # documents timed with the naive per-shingle loop
    full_run: bool = True         # also time a run with boilerplate removal, decontamination and writing
    out_dir: str = "out/bench_dedup"
    seed: int = 0


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


def shingle_set(text, n=5):
    w = normalize_words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} or {tuple(w)}


def jaccard(a, b):
    return len(a & b) / max(len(a | b), 1)


def make_corpus(cfg, corpus_dir):
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


def main(argv):
    _, cfg = parse_cli(BenchConfig, argv)
    cores = dedup.num_workers(cfg.workers)
    corpus_dir = os.path.join(cfg.out_dir, "corpus")
    t0 = time.time()
    texts, family, truth, truth_j = cached_corpus(cfg, corpus_dir)
    print(f"corpus: {len(texts):,} docs, mean {np.mean([len(t) for t in texts]):.0f} chars, "
          f"{len(truth):,} planted pairs ({(truth_j >= 0.85).sum():,} with Jaccard >= 0.85), made in {time.time() - t0:.0f}s")

    # the timed run: near-duplicates only, nothing written, so the figure is reading -> clusters
    dcfg = dedup.DedupConfig(inputs=corpus_dir, out_dir=os.path.join(cfg.out_dir, "dedup"), threshold=cfg.threshold,
                             num_perm=cfg.num_perm, workers=cfg.workers, decontaminate=False,
                             segment_dedup=False, write=False)
    res = dedup.run(dcfg)
    t = res["stats"]["timings_s"]
    elapsed = t["total"]
    rate = len(texts) / elapsed
    peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    # quality against the planted truth
    found = cluster_pairs(res["roots"])
    fam = family
    same_family = np.array([fam[i] == fam[j] for i, j in found], dtype=bool)
    precision = same_family.mean() if found else 1.0
    found_set = set(found)
    hit = np.array([(int(i), int(j)) in found_set for i, j in truth], dtype=bool)
    strong = truth_j >= 0.85
    recall = hit[strong].mean()
    # strict precision: found pairs whose exact Jaccard really is >= threshold
    jac_of = {(int(i), int(j)): x for (i, j), x in zip(truth, truth_j)}
    exact = np.array([jac_of.get((i, j)) if (i, j) in jac_of else jaccard(shingle_set(texts[i]), shingle_set(texts[j]))
                      for i, j in found]) if found else np.zeros(0)
    strict_precision = (exact >= cfg.threshold).mean() if found else 1.0
    buckets = {}
    edges = [0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.01]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (truth_j >= lo) & (truth_j < hi)
        if sel.any():
            name = "1.0 (exact copies)" if lo == 1.0 else f"[{lo:.2f}, {hi:.2f})"
            buckets[name] = {"pairs": int(sel.sum()), "recall": round(float(hit[sel].mean()), 4)}

    # baselines, same machine, same run, one core
    rng = np.random.default_rng(1)
    sample = [texts[i] for i in rng.choice(len(texts), cfg.naive_docs, replace=False)]
    naive = naive_minhash_rate(sample, cfg.num_perm)
    bulk = bulk_minhash_rate(sample, cfg.num_perm)

    results = {
        "docs": len(texts), "cores": cores, "mean_doc_chars": round(float(np.mean([len(x) for x in texts])), 1),
        "end_to_end_s": elapsed, "docs_per_s": round(rate, 1), "docs_per_s_per_core": round(rate / cores, 1),
        "timings_s": t, "peak_rss_mb": {"main": round(peak_main), "largest_worker": round(peak_worker)},
        "planted_pairs": int(len(truth)), "planted_pairs_j085": int(strong.sum()), "found_pairs": len(found),
        "precision": round(float(precision), 4), "strict_precision_exact_j_ge_threshold": round(float(strict_precision), 4),
        "recall_j085": round(float(recall), 4), "recall_by_jaccard": buckets,
        # wall-clock rates (1 core for the baselines) and CPU-time rates (robust when the machine is shared)
        "docs_per_cpu_s": round(len(texts) / res["stats"]["cpu_s"], 1),
        "naive_update_loop_docs_per_s_1core": round(naive[0], 1), "naive_docs_per_cpu_s": round(naive[1], 1),
        "datasketch_bulk_docs_per_s_1core": round(bulk[0], 1), "bulk_docs_per_cpu_s": round(bulk[1], 1),
        "speedup_per_core_vs_naive": round(rate / cores / naive[0], 1),
        "speedup_per_cpu_s_vs_naive": round(len(texts) / res["stats"]["cpu_s"] / naive[1], 1),
        "speedup_per_cpu_s_vs_bulk": round(len(texts) / res["stats"]["cpu_s"] / bulk[1], 1),
        "load_average_1min": os.getloadavg()[0],
        "lsh": res["stats"]["lsh"], "near_dup": res["stats"]["near_dup"],
    }
    if cfg.full_run:
        fcfg = dedup.DedupConfig(inputs=corpus_dir, out_dir=os.path.join(cfg.out_dir, "dedup_full"),
                                 threshold=cfg.threshold, num_perm=cfg.num_perm, workers=cfg.workers,
                                 decontaminate=os.path.isdir(dcfg.eval_dir), segment_sketch_mb=64)
        full = dedup.run(fcfg)
        results["full_run"] = {"docs_per_s": full["stats"]["docs_per_s"], "timings_s": full["stats"]["timings_s"],
                               "decontaminate": fcfg.decontaminate,
                               "note": "boilerplate counting + removal, 13-gram decontamination, writing output"}
    targets = {"recall_j085 >= 0.95": results["recall_j085"] >= 0.95, "precision >= 0.95": results["precision"] >= 0.95,
               "docs/s/core >= 5000": results["docs_per_s_per_core"] >= 5000,
               "speedup vs naive >= 10x": results["speedup_per_core_vs_naive"] >= 10}
    results["targets_met"] = targets
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k not in ("near_dup",)}, indent=1))
    print("targets: " + ", ".join(f"{k}: {'OK' if v else 'MISSED'}" for k, v in targets.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
