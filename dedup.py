"""
Deduplication of several sources together (cross-source), three ways:

1. near-duplicates: a MinHash signature per document over its word 5-gram shingles, LSH banding to
   find candidate pairs, candidates verified by the Jaccard similarity their full signatures
   estimate, clusters by union-find, and one document kept per cluster: the one from the most
   preferred source (--priority), then the highest quality score (FineWeb-Edu's `score`), then the
   longest.
2. boilerplate segments: a line that appears verbatim in at least --segment_min_docs documents
   ("Share this article", cookie banners, licence headers) is cut out of every document.
3. benchmark overlap: a document that shares a 13-gram with any eval set (GSM8K test, the
   multiple-choice sets; local files or downloads) is dropped.

    python dedup.py --inputs=out/gated --priority=finemath,fineweb_edu --out_dir=out/dedup
    python dedup.py --inputs=a.jsonl,b.parquet --evals=gsm8k,mmlu --threshold=0.7

Two passes over the inputs. Pass 1, on all cores: shingle hashes -> signature -> LSH band keys,
13-gram overlap with the eval sets, hashes of the document's lines. Then, in the main process:
band-key collisions -> candidate pairs -> verified pairs -> clusters -> which document survives.
Pass 2 re-reads the inputs and writes the survivors, boilerplate lines removed, to
out_dir/<source>/part_*.jsonl, plus out_dir/stats.json (documents and tokens in/out per rule and
per source, the cluster-size histogram).

Memory: no text is held. Per document the main process keeps `bands` 8-byte band keys and a few
numbers; the signatures go to a scratch file on disk; line counts live in a fixed-size count-min
sketch (--segment_sketch_mb). So 10M documents need about 1.5 GB, whatever their length.
"""
import csv
import glob
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing import Pool

import numpy as np

from data import (batch_ngram_hashes, batch_word_hashes, expand_inputs, iter_corpus, JsonlWriter, mix64,
                  normalize_words, num_workers, ordered_map, parse_cli, _write_json)

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class DedupConfig:
    inputs: str = "out/gated"     # comma-separated files / folders (see data.expand_inputs); name=path names a source
    out_dir: str = "out/dedup"
    priority: str = ""            # source names, most preferred first; unlisted sources follow in input order
    text_field: str = "text"
    write: bool = True            # pass 2: write the surviving documents (off: only decide and report)
    # near-duplicates
    near_dedup: bool = True
    threshold: float = 0.8        # Jaccard similarity of word 5-gram sets above which two documents are duplicates
    ngram: int = 5
    num_perm: int = 128           # signature length; the Jaccard estimate's std is sqrt(J(1-J)/num_perm)
    bands: int = 0                # 0 = chosen for the threshold (with rows)
    rows: int = 0
    seed: int = 1
    # boilerplate segments
    segment_dedup: bool = True
    segment_min_docs: int = 20    # a line in at least this many documents is boilerplate
    segment_min_chars: int = 30   # shorter lines ("Thanks!", "}") are left alone
    segment_sketch_mb: int = 256  # memory for counting lines (count-min sketch, 2 rows)
    segment_skip_sources: str = "code"  # sources whose repeated lines are content (import lines...)
    # benchmark decontamination
    decontaminate: bool = True
    evals: str = "default"        # "default" (every known set found locally, else downloaded), names / paths, or ""
    eval_dir: str = os.path.join(REPO_DIR, "..", "shared", "data")
    eval_ngram: int = 13
    # execution
    workers: int = 0              # 0 = all cores
    batch_docs: int = 1000
    docs_per_file: int = 100_000


# -----------------------------------------------------------------------------
# MinHash + LSH

def choose_bands_rows(threshold, num_perm, fp_weight=0.05, fn_weight=0.95):
    """Bands x rows (b*r <= num_perm) minimising the weighted areas under the LSH S-curve
    P(candidate | J) = 1 - (1 - J^r)^b on the wrong side of the threshold: the objective of
    datasketch.lsh._optimal_param, on a numpy grid (datasketch integrates per (b, r) with scipy, ~1 s).
    A missed pair is lost for good while a false candidate only costs a verification, so false
    negatives weigh 0.95."""
    j = np.linspace(0.0, 1.0, 1001)
    dj = j[1] - j[0]
    below, above = j <= threshold, j >= threshold
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1)[:, None]
        p = 1.0 - (1.0 - j[None, :] ** r) ** b
        fp = np.trapezoid(p[:, below], dx=dj, axis=1)
        fn = np.trapezoid(1.0 - p[:, above], dx=dj, axis=1)
        err = fp_weight * fp + fn_weight * fn
        k = int(err.argmin())
        if err[k] < best_err:
            best, best_err = (b, int(r[k, 0])), err[k]
    return best


def minhash_permutations(num_perm, seed):
    """Per slot a random odd multiplier and an offset of the permutation x -> a*x + b (mod 2^32).
    The shingle hashes fed to it are already uniform (xxhash + splitmix), and on such inputs this
    cheap family estimates Jaccard without bias; in uint32 it runs in SIMD, ~3x faster than uint64."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def minhash_signatures(shingle_hashes, counts, perm_a, perm_b, block=8192):
    """Signatures (n_docs, num_perm) uint32 of many documents at once. Document i owns counts[i] >= 1
    consecutive shingle hashes. The (num_perm x shingles) product is formed a block of ~8k shingles
    at a time so that it stays in cache, then reduced to per-document minima with reduceat."""
    x = (shingle_hashes >> np.uint64(32)).astype(np.uint32)
    ends = np.cumsum(counts)
    starts = ends - counts
    sig = np.empty((len(counts), len(perm_a)), dtype=np.uint32)
    a, b = perm_a[:, None], perm_b[:, None]
    d0 = 0
    while d0 < len(counts):
        d1 = max(d0 + 1, int(np.searchsorted(ends, starts[d0] + block, side="right")))
        s0, s1 = starts[d0], ends[d1 - 1]
        h = np.multiply(a, x[None, s0:s1])  # wraps mod 2^32, as intended
        h += b
        sig[d0:d1] = np.minimum.reduceat(h, starts[d0:d1] - s0, axis=1).T
        d0 = d1
    return sig


def lsh_band_keys(sig, bands, rows):
    """One 64-bit key per band: documents whose `rows` signature values agree in a band collide."""
    s = sig[:, :bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)
    key = np.zeros((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            key = key * np.uint64(0x9E3779B97F4A7C15) + s[:, :, r]
    return mix64(key)


def lsh_candidate_pairs(band_keys):
    """Pairs (i < j) that collide in at least one band. A bucket of m documents yields ~2m pairs, not
    m^2: each member is paired with the bucket's first member and with its predecessor, which is
    enough for union-find and keeps a bucket of 10,000 exact copies cheap."""
    n = len(band_keys)
    found = []
    for band in range(band_keys.shape[1]):
        order = np.argsort(band_keys[:, band], kind="stable")
        k = band_keys[order, band]
        same = k[1:] == k[:-1]
        if not same.any():
            continue
        new_bucket = np.concatenate([[True], ~same])
        bucket_start = np.maximum.accumulate(np.where(new_bucket, np.arange(n), 0))
        member = np.flatnonzero(~new_bucket)
        found.append(np.stack([order[bucket_start[member]], order[member]], axis=1))
        found.append(np.stack([order[member - 1], order[member]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    code = np.unique((pairs[:, 0] << 32) | pairs[:, 1])
    return np.stack([code >> 32, code & 0xFFFFFFFF], axis=1)


def estimated_jaccard(sig, pairs, chunk=65536):
    """Fraction of equal signature slots per pair: an unbiased estimate of the shingle-set Jaccard."""
    est = np.empty(len(pairs), dtype=np.float32)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        est[s:s + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return est


def union_find_clusters(n, pairs):
    """Cluster id (= smallest member index) of every document; pairs are the duplicate edges.
    Only documents that occur in a pair enter the Python loop."""
    roots = np.arange(n)
    if len(pairs) == 0:
        return roots
    nodes, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(-1, 2)
    parent = list(range(len(nodes)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in local.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # nodes are sorted, so the root is the smallest index
    roots[nodes] = nodes[[find(i) for i in range(len(nodes))]]
    return roots


def choose_keepers(roots, priority_rank, score, length, contaminated):
    """True for the document each cluster keeps: not contaminated if possible, then the most preferred
    source, then the highest quality score, then the longest, then the first read."""
    idx = np.arange(len(roots))
    order = np.lexsort((idx, -length, -score, priority_rank, contaminated, roots))
    first = np.concatenate([[True], roots[order][1:] != roots[order][:-1]])
    keep = np.zeros(len(roots), dtype=bool)
    keep[order[first]] = True
    return keep


# -----------------------------------------------------------------------------
# Boilerplate segments: lines counted across documents in a count-min sketch (fixed memory; it can
# only over-count, and with the default 256 MB and 30M distinct lines an over-count of 20 has a
# probability ~1e-20).

class CountMinSketch:
    def __init__(self, megabytes, depth=2):
        self.log2w = max(10, int(np.log2(megabytes * 2**20 / (4 * depth))))
        self.table = np.zeros((depth, 2**self.log2w), dtype=np.uint32)
        self.salts = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93][:depth],
                              dtype=np.uint64)

    def _index(self, hashes, row):
        with np.errstate(over="ignore"):
            return ((hashes * self.salts[row]) >> np.uint64(64 - self.log2w)).astype(np.int64)

    def add(self, hashes):
        for r in range(len(self.table)):
            np.add.at(self.table[r], self._index(hashes, r), 1)

    def estimate(self, hashes):
        return np.min([self.table[r][self._index(hashes, r)] for r in range(len(self.table))], axis=0)


def line_hashes(text, min_chars):
    import xxhash
    return [xxhash.xxh64_intdigest(l.encode("utf-8", "replace")) for l in (l.strip() for l in text.split("\n"))
            if len(l) >= min_chars]


def remove_boilerplate(text, sketch, min_docs, min_chars):
    """text without the lines that at least min_docs documents contain; and how many lines went."""
    lines = text.split("\n")
    cand = [i for i, l in enumerate(lines) if len(l.strip()) >= min_chars]
    if not cand:
        return text, 0
    est = sketch.estimate(np.array(line_hashes("\n".join(lines[i] for i in cand), min_chars), dtype=np.uint64))
    drop = {i for i, e in zip(cand, est) if e >= min_docs}
    if not drop:
        return text, 0
    return "\n".join(l for i, l in enumerate(lines) if i not in drop), len(drop)


# -----------------------------------------------------------------------------
# Eval sets for decontamination. Local copies first (eval_dir, the layout of shared/data), else the
# Hugging Face Hub: (local glob, hub repo, glob over the repo's files).

EVAL_SETS = {
    "gsm8k": ("gsm8k/test.jsonl", "openai/gsm8k", "main/test-*.parquet"),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl", "allenai/ai2_arc", "ARC-Easy/test-*.parquet"),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl", "allenai/ai2_arc", "ARC-Challenge/test-*.parquet"),
    "hellaswag": ("hellaswag/hellaswag_val*.jsonl", "Rowan/hellaswag", "data/validation-*.parquet"),
    "mmlu": ("mmlu/test/*.csv", "cais/mmlu", "all/test-*.parquet"),
    "piqa": ("piqa/valid.jsonl", None, None),
    "winogrande": ("winogrande/dev.jsonl", "allenai/winogrande", "winogrande_xl/validation-*.parquet"),
    "openbookqa": ("openbookqa/openbook_qa*.jsonl", "allenai/openbookqa", "main/test-*.parquet"),
    "boolq": ("boolq/boolq*.jsonl", "google/boolq", "data/validation-*.parquet"),
    "sciq": ("sciq/test.json", "allenai/sciq", "data/test-*.parquet"),
    "commonsenseqa": ("commonsenseqa/dev_rand_split.jsonl", "tau/commonsense_qa", "data/validation-*.parquet"),
    "siqa": ("siqa/dev.jsonl", None, None),
}


def _string_leaves(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _string_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _string_leaves(v)


def read_eval_items(path):
    """One text per eval item: all its string fields joined (question, choices, answer...), whatever
    the format (.jsonl, .json array, header-less .csv like MMLU's, .parquet)."""
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return [" ".join(row) for row in csv.reader(f)]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [" ".join(_string_leaves(r)) for r in pq.read_table(path).to_pylist()]
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return [" ".join(_string_leaves(r)) for r in json.load(f)]
        items = []
        for line in f:
            if line.strip():
                try:
                    items.append(" ".join(_string_leaves(json.loads(line))))
                except json.JSONDecodeError:
                    pass
        return items


def _download_eval(name, cache_dir, hub=None):
    _, repo, pattern = EVAL_SETS[name]
    if repo is None:
        return []
    import fnmatch
    hub = hub or __import__("huggingface_hub")
    files = sorted(f for f in hub.list_repo_files(repo, repo_type="dataset") if fnmatch.fnmatch(f, pattern))
    return [hub.hf_hub_download(repo, f, repo_type="dataset", local_dir=os.path.join(cache_dir, name)) for f in files]


def resolve_eval_files(cfg, hub=None):
    """{eval set name: [files]} from --evals: 'default', or names from EVAL_SETS and/or file paths."""
    if not cfg.evals:
        return {}
    names = list(EVAL_SETS) if cfg.evals == "default" else [s.strip() for s in cfg.evals.split(",") if s.strip()]
    out, missing, offline = {}, [], False
    for name in names:
        if name not in EVAL_SETS:
            if not os.path.exists(name):
                raise SystemExit(f"error: eval set {name!r} is neither a known name ({', '.join(EVAL_SETS)}) nor a file")
            out[os.path.basename(name)] = [name]
            continue
        files = sorted(glob.glob(os.path.join(cfg.eval_dir, EVAL_SETS[name][0])))
        if not files and not offline:
            try:
                files = _download_eval(name, os.path.join(cfg.out_dir, "evals"), hub)
            except Exception as e:
                offline = True  # one failed try is enough: the next would wait through the same retries
                print(f"note: eval set {name} is not under {cfg.eval_dir} and the Hub is unreachable "
                      f"({type(e).__name__}); not downloading eval sets")
        if files:
            out[name] = files
        else:
            missing.append(name)
    if not out:
        raise SystemExit(f"error: no eval set found for decontamination (looked in {cfg.eval_dir}, and the Hub). "
                         f"Pass --eval_dir=<folder with gsm8k/, mmlu/, ...>, --evals=<files>, or --decontaminate=false.")
    if missing and cfg.evals != "default":
        raise SystemExit(f"error: eval sets {missing} not found under {cfg.eval_dir} and not downloadable; "
                         f"pass their files as --evals=path.jsonl,... or drop them from --evals")
    return out


def eval_ngram_index(eval_files, n):
    """Sorted unique n-gram hashes of all eval items, and the eval set each one came from."""
    hashes, set_ids, names = [], [], []
    for k, (name, files) in enumerate(eval_files.items()):
        names.append(name)
        items = [t for f in files for t in read_eval_items(f)]
        for s in range(0, len(items), 2000):
            h, _ = batch_ngram_hashes(*batch_word_hashes(items[s:s + 2000]), n)
            hashes.append(h)
            set_ids.append(np.full(len(h), k, dtype=np.int16))
    h, ids = np.concatenate(hashes), np.concatenate(set_ids)
    h, first = np.unique(h, return_index=True)
    return h, ids[first], names


def eval_bitmap(eval_hashes):
    """A bit per slot of a table ~64x larger than the eval n-gram set, set where an eval n-gram falls:
    a document n-gram whose bit is clear (~99%) cannot be in the set, which one random read tells,
    while a binary search of a 3M-entry array costs ~20 cache misses."""
    log2_bits = int(np.clip(np.ceil(np.log2(max(len(eval_hashes), 1) * 64)), 20, 32))
    bits = np.zeros(2**log2_bits // 8, dtype=np.uint8)
    slot = eval_hashes >> np.uint64(64 - log2_bits)
    np.bitwise_or.at(bits, (slot >> np.uint64(3)).astype(np.int64), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8))
    return bits, log2_bits


def eval_overlap(ngram_hashes_, counts, eval_hashes, eval_set_ids, bitmap=None):
    """Per document: index of an eval set sharing an n-gram with it, or -1."""
    out = np.full(len(counts), -1, dtype=np.int16)
    if len(ngram_hashes_) == 0 or len(eval_hashes) == 0:
        return out
    bits, log2_bits = bitmap if bitmap is not None else eval_bitmap(eval_hashes)
    slot = ngram_hashes_ >> np.uint64(64 - log2_bits)
    maybe = np.flatnonzero((bits[(slot >> np.uint64(3)).astype(np.int64)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1)
    if len(maybe) == 0:
        return out
    pos = np.minimum(np.searchsorted(eval_hashes, ngram_hashes_[maybe]), len(eval_hashes) - 1)
    hit = eval_hashes[pos] == ngram_hashes_[maybe]
    if not hit.any():
        return out
    doc_of = np.repeat(np.arange(len(counts)), counts)[maybe[hit]]
    out[doc_of[::-1]] = eval_set_ids[pos[hit]][::-1]  # reversed so the first hit in a document wins
    return out


# -----------------------------------------------------------------------------
# Pass 1 worker: everything per document that does not need the other documents.

_W = {}


def _init_worker(state):
    _W.update(state)
    if state["eval_hashes"] is not None:
        _W["eval_bitmap"] = eval_bitmap(state["eval_hashes"])


def document_features(job):
    texts, count_lines = job
    wh, n_words = batch_word_hashes(texts)
    out = {"words": n_words}
    if _W["near_dedup"]:
        sh, counts = batch_ngram_hashes(wh, n_words, _W["ngram"], short_docs_as_one=True)
        sig = minhash_signatures(sh, counts, _W["perm_a"], _W["perm_b"])
        out["sig"], out["keys"] = sig, lsh_band_keys(sig, _W["bands"], _W["rows"])
    if _W["eval_hashes"] is not None:
        h, counts = batch_ngram_hashes(wh, n_words, _W["eval_ngram"])
        out["contaminated"] = eval_overlap(h, counts, _W["eval_hashes"], _W["eval_set_ids"], _W["eval_bitmap"])
    if _W["segment_dedup"]:
        hs = [np.unique(np.array(line_hashes(t, _W["segment_min_chars"]), dtype=np.uint64))
              for t, c in zip(texts, count_lines) if c]
        out["lines"] = np.concatenate(hs) if hs else np.zeros(0, dtype=np.uint64)
    return out


def _batches(corpus, batch_docs, source_ids, skip_segments):
    """Yields ((texts, count-lines flags), per-document [source id, quality score, length])."""
    texts, flags, meta = [], [], []
    for source, rec in corpus:
        score = rec.get("score")
        texts.append(rec["text"])
        flags.append(source not in skip_segments)
        meta.append((source_ids[source], float(score) if isinstance(score, (int, float)) else 0.0, len(rec["text"])))
        if len(texts) == batch_docs:
            yield (texts, flags), np.array(meta, dtype=np.float64)
            texts, flags, meta = [], [], []
    if texts:
        yield (texts, flags), np.array(meta, dtype=np.float64)


def compute_features(cfg, state, source_ids, sig_path, sketch, skip_segments):
    """Pass 1 on all cores. Signatures go to sig_path; line hashes into the sketch; returns per-document
    arrays (meta, word counts, band keys, contaminating eval set) and the reader's counts."""
    from tqdm import tqdm
    counts = {}
    meta, words, keys, contaminated = [], [], [], []
    bar = tqdm(desc="pass 1: signatures", unit="doc", disable=None)
    with Pool(num_workers(cfg.workers), initializer=_init_worker, initargs=(state,)) as pool, \
            open(sig_path, "wb") as sig_file:
        batches = _batches(iter_corpus(cfg.inputs, cfg.text_field, counts), cfg.batch_docs, source_ids, skip_segments)
        for m, out in ordered_map(pool, document_features, batches):
            meta.append(m)
            words.append(out["words"])
            if "sig" in out:
                sig_file.write(out["sig"].tobytes())
                keys.append(out["keys"])
            if "contaminated" in out:
                contaminated.append(out["contaminated"])
            if sketch is not None and len(out["lines"]):
                sketch.add(out["lines"])
            bar.update(len(m))
    bar.close()
    if not meta:
        raise SystemExit(f"error: no documents in {cfg.inputs} (read counts: {_plain(counts)})")
    n = sum(map(len, meta))
    meta = np.concatenate(meta)
    return (meta, np.concatenate(words), np.concatenate(keys) if keys else None,
            np.concatenate(contaminated) if contaminated else np.full(n, -1, dtype=np.int16), counts)


def write_survivors(cfg, survivors, words, sketch, skip_segments, per_source):
    """Pass 2: re-read the inputs in the same order; write the surviving documents, boilerplate lines
    removed, to out_dir/<source>/part_*.jsonl. Updates survivors, words and per_source in place."""
    from tqdm import tqdm
    writers = {s: JsonlWriter(os.path.join(cfg.out_dir, s), cfg.docs_per_file) for s in per_source}
    bar = tqdm(desc="pass 2: write", unit="doc", total=len(survivors), disable=None)
    i = -1
    for i, (source, rec) in enumerate(iter_corpus(cfg.inputs, cfg.text_field)):
        bar.update(1)
        if not survivors[i]:
            continue
        st = per_source[source]
        if sketch is not None and source not in skip_segments:
            text, n_lines = remove_boilerplate(rec["text"], sketch, cfg.segment_min_docs, cfg.segment_min_chars)
            if n_lines:
                new_words = len(normalize_words(text))
                st["segment_lines_removed"] += n_lines
                st["segment_tokens_removed"] += int(words[i]) - new_words
                words[i], rec["text"] = new_words, text
                if not text.strip():
                    st["dropped"]["segment_emptied"]["docs"] += 1
                    survivors[i] = False
                    continue
        writers[source].write(rec)
    bar.close()
    for w in writers.values():
        w.close()
    assert i + 1 == len(survivors), f"inputs changed between passes ({len(survivors)} then {i + 1} documents)"


RULES = ("malformed", "empty", "decontaminated", "near_duplicate", "segment_emptied")


def run(cfg):
    """The whole dedup; returns a dict with the stats and, for tests and the benchmark, the arrays
    (verified pairs, cluster roots, surviving documents)."""
    t_start, cpu_start, cpu_main_start = time.time(), _cpu_seconds(), _cpu_seconds(children=False)
    timings = {}
    os.makedirs(cfg.out_dir, exist_ok=True)
    sources = expand_inputs(cfg.inputs)  # fails early, with a clear line, on a missing input
    names = list(dict.fromkeys(s for s, _ in sources))
    source_ids = {s: i for i, s in enumerate(names)}
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands and cfg.rows else choose_bands_rows(cfg.threshold, cfg.num_perm)
    assert bands * rows <= cfg.num_perm, "bands x rows must not exceed num_perm"
    perm_a, perm_b = minhash_permutations(cfg.num_perm, cfg.seed)
    eval_hashes = eval_set_ids = None
    eval_names = []
    if cfg.decontaminate and cfg.evals:
        eval_hashes, eval_set_ids, eval_names = eval_ngram_index(resolve_eval_files(cfg), cfg.eval_ngram)
        print(f"decontamination: {len(eval_hashes):,} {cfg.eval_ngram}-grams from {', '.join(eval_names)}")
    skip_segments = {s.strip() for s in cfg.segment_skip_sources.split(",") if s.strip()}
    sketch = CountMinSketch(cfg.segment_sketch_mb) if cfg.segment_dedup else None
    state = dict(near_dedup=cfg.near_dedup, ngram=cfg.ngram, perm_a=perm_a, perm_b=perm_b, bands=bands, rows=rows,
                 eval_hashes=eval_hashes, eval_set_ids=eval_set_ids, eval_ngram=cfg.eval_ngram,
                 segment_dedup=cfg.segment_dedup, segment_min_chars=cfg.segment_min_chars)

    t0 = time.time()
    sig_path = os.path.join(cfg.out_dir, ".signatures.u32")
    try:
        meta, words, keys, contaminated, counts = compute_features(cfg, state, source_ids, sig_path, sketch,
                                                                   skip_segments)
        n = len(meta)
        source_of, score, length = meta[:, 0].astype(np.int64), meta[:, 1], meta[:, 2]
        timings["pass1_signatures"] = time.time() - t0

        # near-duplicate clusters
        pairs, n_candidates = np.zeros((0, 2), dtype=np.int64), 0
        if cfg.near_dedup:
            t0 = time.time()
            candidates = lsh_candidate_pairs(keys)
            del keys
            n_candidates = len(candidates)
            timings["lsh_candidates"] = time.time() - t0
            t0 = time.time()
            sig = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, cfg.num_perm))
            pairs = candidates[estimated_jaccard(sig, candidates) >= cfg.threshold]
            del sig
            timings["verify"] = time.time() - t0
    finally:
        if os.path.exists(sig_path):
            os.remove(sig_path)
    t0 = time.time()
    roots = union_find_clusters(n, pairs)
    order = [s.strip() for s in cfg.priority.split(",") if s.strip()]
    rank_of_source = np.array([order.index(s) if s in order else len(order) + i for i, s in enumerate(names)])
    is_contaminated = contaminated >= 0
    keep = choose_keepers(roots, rank_of_source[source_of], score, length, is_contaminated)
    timings["clusters"] = time.time() - t0

    # per source and rule: documents and tokens in, dropped, out
    per_source = {s: {"docs_in": 0, "tokens_in": 0, "docs_out": 0, "tokens_out": 0,
                      "dropped": {r: {"docs": 0, "tokens": 0} for r in RULES},
                      "segment_lines_removed": 0, "segment_tokens_removed": 0} for s in names}
    near_dup = ~keep & ~is_contaminated  # a contaminated document counts as such, whatever its cluster
    for i, s in enumerate(names):
        st, sel = per_source[s], source_of == i
        st["docs_in"], st["tokens_in"] = int(sel.sum()), int(words[sel].sum())
        for r, mask in (("decontaminated", is_contaminated), ("near_duplicate", near_dup)):
            st["dropped"][r] = {"docs": int((sel & mask).sum()), "tokens": int(words[sel & mask].sum())}
    survivors = keep & ~is_contaminated
    t0 = time.time()
    if cfg.write:
        write_survivors(cfg, survivors, words, sketch, skip_segments, per_source)
    timings["pass2_write"] = time.time() - t0
    for i, s in enumerate(names):
        st, sel = per_source[s], (source_of == i) & survivors
        st["docs_out"], st["tokens_out"] = int(sel.sum()), int(words[sel].sum())
        for r in ("malformed", "empty"):
            st["dropped"][r]["docs"] = int(counts.get(s, {}).get(r, 0))
            st["docs_in"] += st["dropped"][r]["docs"]

    # clusters: size histogram, and how many span several sources
    sizes = Counter(np.unique(roots, return_counts=True)[1].tolist())
    in_cluster = np.isin(roots, roots[roots != np.arange(n)])
    root_source = np.unique(np.stack([roots[in_cluster], source_of[in_cluster]], axis=1), axis=0)
    cross = int((np.unique(root_source[:, 0], return_counts=True)[1] > 1).sum()) if len(root_source) else 0
    totals = {k: sum(st[k] for st in per_source.values()) for k in ("docs_in", "tokens_in", "docs_out", "tokens_out")}
    totals["dropped"] = {r: {k: sum(st["dropped"][r][k] for st in per_source.values()) for k in ("docs", "tokens")}
                         for r in RULES}
    totals["segment_lines_removed"] = sum(st["segment_lines_removed"] for st in per_source.values())
    timings["total"] = time.time() - t_start
    stats = {
        "note": "tokens = normalized words (lowercased, punctuation split off); exact BPE counts come from the "
                "tokenize step. A document both contaminated and a near-duplicate counts as decontaminated.",
        "config": asdict(cfg), "lsh": {"bands": bands, "rows": rows, "num_perm": cfg.num_perm},
        "totals": totals, "per_source": per_source,
        "decontaminated_by_eval": {name: int((contaminated == k).sum()) for k, name in enumerate(eval_names)},
        "near_dup": {"candidate_pairs": int(n_candidates), "verified_pairs": int(len(pairs)),
                     "clusters": int(sum(c for s, c in sizes.items() if s > 1)), "cross_source_clusters": cross,
                     "cluster_size_histogram": {str(s): c for s, c in sorted(sizes.items())}},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "docs_per_s": round(n / timings["total"], 1),
        # CPU seconds of this process and its (finished) workers: per-core speed even on a busy machine
        "cpu_s": round(_cpu_seconds() - cpu_start, 3),
        "cpu_s_main_process": round(_cpu_seconds(children=False) - cpu_main_start, 3),
        "peak_rss_mb": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024},
    }
    _write_json(os.path.join(cfg.out_dir, "stats.json"), stats)
    d = totals["dropped"]
    print(f"dedup: {totals['docs_in']:,} -> {totals['docs_out']:,} docs ({totals['tokens_in']:,} -> "
          f"{totals['tokens_out']:,} words); near-dup {d['near_duplicate']['docs']:,}, decontaminated "
          f"{d['decontaminated']['docs']:,}, malformed {d['malformed']['docs']}, empty {d['empty']['docs']}, "
          f"boilerplate lines {totals['segment_lines_removed']:,}; {timings['total']:.1f}s -> {cfg.out_dir}")
    return {"stats": stats, "pairs": pairs, "roots": roots, "keep": survivors, "sources": names, "source_of": source_of}


def _cpu_seconds(children=True):
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + (kids.ru_utime + kids.ru_stime if children else 0.0)


def _plain(counts):
    return {s: dict(c) for s, c in counts.items()}


if __name__ == "__main__":
    _, cfg = parse_cli(DedupConfig, sys.argv[1:])
    run(cfg)
