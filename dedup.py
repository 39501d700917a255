"""
Deduplication of several sources together (cross-source), three ways:

1. near-duplicates: documents with identical word 5-gram shingles are exact copies (one 64-bit
   fingerprint each); one representative of each such group gets a MinHash signature,
   LSH banding finds candidate pairs (every pair a bucket implies, up to --lsh_max_bucket members
   per bucket, the rest counted), each candidate is verified by the EXACT Jaccard similarity of the
   two shingle sets (not the signature's estimate), clusters form by union-find, and one document
   is kept per cluster: the one from the most preferred source (--priority), then the highest
   quality score (FineWeb-Edu's `score`), then the longest.
2. boilerplate segments: a line that appears verbatim in at least --segment_min_docs of the documents
   that SURVIVE steps 1 and 3 ("Share this article", cookie banners, licence headers) is cut out of
   them. Counting after near-dedup means a paragraph repeated only because its document was copied
   30 times is content, not boilerplate.
3. benchmark overlap: a document that shares a 13-gram with an eval item's text, or contains the
   whole text of an item shorter than 13 words (at least --eval_min_words), is dropped. Each item is
   indexed per field: question; question + each answer; a passage on its own; WinoGrande's sentence
   with the blank filled by each option; LAMBADA's whole passage.

    python dedup.py --inputs=out/gated --priority=finemath,fineweb_edu --out_dir=out/dedup
    python dedup.py --inputs=a.jsonl,b.parquet --evals=gsm8k,mmlu --threshold=0.7
    python dedup.py --inputs=out/gated --eval_dir=../shared/data      # eval sets from a local folder

Words are data.py's (Unicode letters/digits, typographic quotes/dashes normalised), lowercased.

Two passes over the inputs. Pass 1, on all cores: word hashes -> shingle set (kept, 4 bytes a
shingle, in a scratch file), signature (scratch file) -> LSH band keys, eval-item overlap, hashes of
the document's lines (scratch file). Then, in the main process: exact copies -> band-key collisions ->
candidate pairs -> exact Jaccard -> clusters -> which documents survive -> line counts over the
survivors. Pass 2 re-reads the inputs and writes the survivors, boilerplate lines removed, to
out_dir/<source>/part_*.jsonl, plus out_dir/stats.json (documents and tokens in/out per rule and
per source, the cluster-size histogram, how many bucket pairs the bound left out).

Memory: no text is held. Per document the main process keeps `bands` 8-byte band keys, an 8-byte
fingerprint and a few numbers; signatures, shingle sets and line hashes go to scratch files in
out_dir (about 0.7x the size of the text, deleted at the end). The line counter is a count-min
sketch sized from the number of survivor lines (at most --segment_sketch_mb), so a few hundred
documents use kilobytes and 10M documents about 1.5 GB plus the sketch.
"""
import os
import resource
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing import Pool

import numpy as np

from data import (expand_inputs, iter_corpus, JsonlWriter, mix64, ngram_hashes, normalize_words, num_workers,
                  ordered_map, word_bytes)
from benchmarks import DEFAULT_DATA_DIR, EVAL_SETS, download_eval_set, eval_item_texts, local_eval_files
from common import atomic_write, progress

_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # data.ngram_hashes' multiplier
_BYTE_MULT = 0x100000001B3                     # odd, so invertible mod 2^64
_powers_cache = [np.ones(1, np.uint64), np.ones(1, np.uint64)]


@dataclass
class DedupConfig:
    inputs: str = "out/gated"     # comma-separated files / folders (see data.expand_inputs); name=path names a source
    out_dir: str = "out/dedup"
    priority: str = ""            # source names, most preferred first; unlisted sources follow in input order
    text_field: str = "text"
    write: bool = True            # pass 2: write the surviving documents (off: only decide and report)
    # near-duplicates
    near_dedup: bool = True
    threshold: float = 0.8        # exact Jaccard similarity of word 5-gram sets at or above which two documents are duplicates
    ngram: int = 5
    num_perm: int = 128           # signature length (LSH only: candidates are verified exactly)
    bands: int = 0                # 0 = chosen for the threshold and lsh_min_recall (with rows)
    rows: int = 0
    lsh_min_recall: float = 0.995  # bands x rows chosen so that a pair at the threshold becomes a candidate this often
    lsh_max_bucket: int = 200     # a bucket pairs each member with at most this many members before it (all pairs below)
    seed: int = 1
    # boilerplate segments
    segment_dedup: bool = True
    segment_min_docs: int = 20    # a line in at least this many surviving documents is boilerplate
    segment_min_chars: int = 30   # shorter lines ("Thanks!", "}") are left alone
    segment_sketch_mb: int = 256  # at most this much memory for counting lines (sized from the corpus below it)
    segment_skip_sources: str = "code"  # sources whose repeated lines are content (import lines...)
    # benchmark decontamination
    decontaminate: bool = True
    evals: str = "default"        # "default" (every known set found locally, else downloaded), names / paths, or ""
    eval_dir: str = DEFAULT_DATA_DIR  # local eval sets, laid out as shared/data
    eval_ngram: int = 13
    eval_min_words: int = 8       # an eval text shorter than eval_ngram words is matched whole if it has this many
    # execution
    workers: int = 0              # 0 = all cores
    batch_docs: int = 1000
    docs_per_file: int = 100_000


# -----------------------------------------------------------------------------
# Word and n-gram hashes of many documents at once (data.py defines the words).

def _byte_powers(n):
    """M^i and M^-i mod 2^64 for i < n (cached, grown by doubling)."""
    pw, ipw = _powers_cache
    if len(pw) < n:
        m = max(n, 2 * len(pw))
        pw = np.cumprod(np.full(m, _BYTE_MULT, dtype=np.uint64))
        ipw = np.cumprod(np.full(m, pow(_BYTE_MULT, -1, 2**64), dtype=np.uint64))
        pw, ipw = np.concatenate([[np.uint64(1)], pw[:-1]]), np.concatenate([[np.uint64(1)], ipw[:-1]])
        _powers_cache[:] = [pw, ipw]
    return pw[:n], ipw[:n]


def batch_word_hashes(texts):
    """64-bit hashes of the normalized words of many texts, with no Python loop over words: the texts
    are joined into one byte array; a word's hash is the polynomial sum(byte_i * M^i) read off
    prefix sums (mod 2^64) and shifted back by M^-start, then mixed. Returns (hashes, counts), the
    hashes of text k being hashes[sum(counts[:k]) : sum(counts[:k+1])]."""
    joined = b"\0".join([word_bytes(t) for t in texts]) + b"\0"
    arr = np.frombuffer(joined, dtype=np.uint8)
    edge = np.diff((arr > 32).view(np.int8), prepend=np.int8(0))  # +1 where a word starts, -1 after it ends
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    pw, ipw = _byte_powers(len(arr))
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(arr) + 1, dtype=np.uint64)
        np.cumsum(arr * pw, out=prefix[1:])
        h = (prefix[ends] - prefix[starts]) * ipw[starts] + (ends - starts).astype(np.uint64)
    doc_of_word = np.searchsorted(np.flatnonzero(arr == 0), starts)  # the \0 after each text ends it
    return mix64(h), np.bincount(doc_of_word, minlength=len(texts))


def batch_ngram_hashes(word_hashes, word_counts, n, short_docs_as_one=False):
    """N-gram hashes of many documents at once (their word hashes concatenated, word_counts words
    each). Returns (hashes, counts) like batch_word_hashes. With short_docs_as_one, a document of
    fewer than n words gets one hash of all its words, so that it still has a MinHash signature."""
    lens = np.asarray(word_counts, dtype=np.int64)
    counts = np.maximum(lens - n + 1, 0)
    short = counts == 0
    if short_docs_as_one:
        counts[short] = 1
    h = ngram_hashes(word_hashes, n)
    # keep the windows that start at least n-1 words before their document's end
    doc_start = np.repeat(np.cumsum(lens) - lens, lens)[:len(h)]
    valid = np.arange(len(h)) - doc_start <= np.repeat(lens - n, lens)[:len(h)]
    out = np.empty(int(counts.sum()), dtype=np.uint64)
    out[np.repeat(~short, counts)] = h[valid]
    if short_docs_as_one and short.any():
        first_word, first_out = np.cumsum(lens) - lens, np.cumsum(counts) - counts
        for i in np.flatnonzero(short):
            acc = np.uint64(lens[i])  # the document with no words hashes to a constant of its own
            with np.errstate(over="ignore"):
                for w in word_hashes[first_word[i]:first_word[i] + lens[i]]:
                    acc = acc * _NGRAM_MULT + w
            out[first_out[i]] = mix64(np.array([acc], dtype=np.uint64))[0]
    return out, counts




# -----------------------------------------------------------------------------
# Exact copies, MinHash + LSH, exact Jaccard

def shingle_values(shingle_hashes):
    """The shingles as uint32: the high 32 bits of the 64-bit hashes, which the signatures use too.
    Two distinct shingles of one pair of documents share 32 bits with probability ~n*m/2^32 (1e-5 for
    1 KB documents), so Jaccard over these values is exact for all practical purposes."""
    return (shingle_hashes >> np.uint64(32)).astype(np.uint32)


def set_fingerprints(values, counts):
    """A 64-bit fingerprint of each document's shingle multiset (order-free sum of mixed elements, then
    the count): equal fingerprints = the same word sequence up to order of shingles, i.e. exact copies
    after word normalisation. (Copies that differ only in how often a shingle repeats are left to the
    LSH path, where their Jaccard of 1.0 makes them certain candidates.)"""
    mixed = mix64(values.astype(np.uint64) ^ np.uint64(0x5851F42D4C957F2D))
    starts = np.cumsum(counts) - counts
    with np.errstate(over="ignore"):
        s = np.add.reduceat(mixed, starts) if len(mixed) else np.zeros(len(counts), np.uint64)
        return mix64(s + np.asarray(counts).astype(np.uint64))


def choose_bands_rows(threshold, num_perm, fp_weight=0.05, fn_weight=0.95, min_recall=None):
    """Bands x rows (b*r <= num_perm) minimising the weighted areas under the LSH S-curve
    P(candidate | J) = 1 - (1 - J^r)^b on the wrong side of the threshold: the objective of
    datasketch.lsh._optimal_param, on a numpy grid (datasketch integrates per (b, r) with scipy, ~1 s).
    With min_recall, the (b, r) of least false-candidate area among those that make a pair AT the
    threshold a candidate with at least that probability: what run() uses, since every candidate is
    verified exactly, so a false candidate costs one cheap check while a missed pair is lost."""
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
        if min_recall is not None:
            err = np.where(1.0 - (1.0 - threshold ** r[:, 0]) ** b >= min_recall, fp, np.inf)
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


def lsh_candidate_pairs(band_keys, max_bucket=200):
    """Pairs (i < j) that collide in at least one band: every pair inside a bucket of up to max_bucket
    members; in a larger bucket each member is paired with the max_bucket - 1 members before it (in
    document order), which keeps the work linear and still chains the bucket together. Returns
    (pairs, info) with info = {"large_buckets": buckets over the bound, "pairs_left_out": bucket
    pairs not emitted because of it}, summed over bands."""
    n = len(band_keys)
    found, large, left_out = [], 0, 0
    for band in range(band_keys.shape[1]):
        order = np.argsort(band_keys[:, band], kind="stable")  # stable: document order inside a bucket
        k = band_keys[order, band]
        new_bucket = np.concatenate([[True], k[1:] != k[:-1]])
        if new_bucket.all():
            continue
        rank = np.arange(n) - np.maximum.accumulate(np.where(new_bucket, np.arange(n), 0))  # place in its bucket
        sizes = np.diff(np.append(np.flatnonzero(new_bucket), n))
        over = sizes[sizes > max_bucket].astype(np.int64)
        large += len(over)
        left_out += int((over * (over - 1) // 2 - (max_bucket * (max_bucket - 1) // 2
                                                   + (over - max_bucket) * (max_bucket - 1))).sum())
        member = np.flatnonzero(rank > 0)
        for d in range(1, max_bucket):
            member = member[rank[member] >= d]
            if len(member) == 0:
                break
            found.append(np.stack([order[member - d], order[member]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64), {"large_buckets": large, "pairs_left_out": left_out}
    pairs = np.sort(np.concatenate(found), axis=1).astype(np.int64)
    code = sorted_unique((pairs[:, 0] << 32) | pairs[:, 1])
    return np.stack([code >> 32, code & 0xFFFFFFFF], axis=1), {"large_buckets": large, "pairs_left_out": left_out}


def estimated_jaccard(sig, pairs, chunk=65536):
    """Fraction of equal signature slots per pair: an unbiased estimate of the shingle-set Jaccard."""
    est = np.empty(len(pairs), dtype=np.float32)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        est[s:s + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return est


def sorted_unique(x):
    """np.unique of a 1-D array by sort + mask: numpy 2.x's np.unique is ~20x slower on 1M uint64 here."""
    s = np.sort(x)
    return s[np.concatenate([[True], s[1:] != s[:-1]])] if len(s) else s


def _gather(values, starts, lens):
    """values[starts[0]:starts[0]+lens[0]] ++ values[starts[1]:...] ++ ... in one fancy index."""
    idx = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    return np.asarray(values[idx])


def exact_jaccard(pairs, values, offsets, chunk=1 << 22):
    """|A & B| / |A | B| of the shingle sets of each pair; document i's shingles (repeats allowed) are
    values[offsets[i]:offsets[i+1]] (values may be a memmap). Vectorised: a chunk of pairs is tagged
    pair-index << 32 | shingle, each side made a set (sorted_unique), and one intersect1d counts the
    common shingles of all the chunk's pairs."""
    out = np.empty(len(pairs), dtype=np.float64)
    if len(pairs) == 0:
        return out
    sizes = np.diff(offsets)
    la, lb = sizes[pairs[:, 0]], sizes[pairs[:, 1]]
    cum = np.cumsum(la + lb)
    s = 0
    while s < len(pairs):
        e = max(s + 1, int(np.searchsorted(cum, (cum[s - 1] if s else 0) + chunk, side="right")))
        p, tag = pairs[s:e], np.arange(e - s, dtype=np.uint64) << np.uint64(32)
        a = sorted_unique(np.repeat(tag, la[s:e]) | _gather(values, offsets[p[:, 0]], la[s:e]).astype(np.uint64))
        b = sorted_unique(np.repeat(tag, lb[s:e]) | _gather(values, offsets[p[:, 1]], lb[s:e]).astype(np.uint64))
        na = np.bincount((a >> np.uint64(32)).astype(np.int64), minlength=e - s)
        nb = np.bincount((b >> np.uint64(32)).astype(np.int64), minlength=e - s)
        inter = np.bincount((np.intersect1d(a, b, assume_unique=True) >> np.uint64(32)).astype(np.int64),
                            minlength=e - s)
        out[s:e] = inter / (na + nb - inter)
        s = e
    return out


def exact_copy_groups(fingerprints):
    """For each document, the first document (lowest index) with the same shingle-set fingerprint."""
    order = np.argsort(fingerprints, kind="stable")
    f = fingerprints[order]
    new = np.concatenate([[True], f[1:] != f[:-1]])
    first = order[np.maximum.accumulate(np.where(new, np.arange(len(f)), 0))]
    rep = np.empty(len(f), dtype=np.int64)
    rep[order] = first
    return rep


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
# Boilerplate segments: line hashes counted over the surviving documents in a count-min sketch. It
# can only over-count; its width is the number of survivor line entries rounded up to a power of two
# (capped by segment_sketch_mb), so a cell holds ~1 other line on average and an over-count of 20
# in both rows has a probability below 1e-30.

class CountMinSketch:
    def __init__(self, megabytes=None, depth=2, items=None):
        """Sized for `items` entries (at most `megabytes`), or `megabytes` when items is None."""
        cap = max(10, int(np.log2(megabytes * 2**20 / (4 * depth)))) if megabytes else 40
        self.log2w = min(cap, max(10, int(np.ceil(np.log2(max(items, 1)))))) if items is not None else cap
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
# Decontamination: which eval sets to use, their index, and the overlap test. The sets and the texts
# of each item come from benchmarks.py's registry (EVAL_SETS, eval_item_texts): one registry for
# evaluation and decontamination, so a set added for evaluation is decontaminated against too.

def hub_reachable(timeout=3.0):
    """One quick connection attempt, so that an offline machine fails at once instead of waiting
    through huggingface_hub's retries (~30 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_eval_files(cfg, hub=None):
    """{eval set name: [files]} from --evals: 'default', or names from EVAL_SETS and/or file paths.
    Local files under --eval_dir first; the Hub only for what is missing and only if it answers."""
    if not cfg.evals:
        return {}
    names = list(EVAL_SETS) if cfg.evals == "default" else [s.strip() for s in cfg.evals.split(",") if s.strip()]
    out, missing = {}, []
    for name in names:
        if name not in EVAL_SETS:
            if not os.path.exists(name):
                raise SystemExit(f"error: eval set {name!r} is neither a known name ({', '.join(EVAL_SETS)}) nor a file")
            out[os.path.basename(name)] = [name]
            continue
        files = local_eval_files(name, cfg.eval_dir)
        if files:
            out[name] = files
        else:
            missing.append(name)
    downloadable = [m for m in missing if EVAL_SETS[m][1]]
    online = hub is not None or (downloadable and hub_reachable())
    if downloadable and online:
        hub = hub or __import__("huggingface_hub")
        for name in downloadable:
            try:
                files = download_eval_set(name, os.path.join(cfg.out_dir, "evals"), hub)
            except Exception as e:
                print(f"note: eval set {name} is not under {cfg.eval_dir} and the Hub failed ({type(e).__name__}); "
                      f"not downloading eval sets")
                break
            if files:
                out[name] = files
                missing.remove(name)
    where = f"{cfg.eval_dir}" + (" or the Hub" if online else " (the Hub is unreachable)")
    if not out:
        raise SystemExit(f"error: no eval set found for decontamination (not in {where}). Pass "
                         f"--eval_dir=<folder with gsm8k/, mmlu/, ... as in shared/data>, --evals=<files>, or "
                         f"--decontaminate=false.")
    if missing and cfg.evals != "default":
        raise SystemExit(f"error: eval sets {missing} not found in {where}; pass --eval_dir, or their files as "
                         f"--evals=path.jsonl,..., or drop them from --evals")
    if missing:
        print(f"note: eval sets not found in {where}, not decontaminated against: {', '.join(missing)}")
    return out


def eval_ngram_index(eval_files, n, min_words):
    """Sorted unique hashes of every n-gram of every eval text, plus, for texts shorter than n words
    (but at least min_words), the hash of the whole text (data.ngram_hashes over its k words, the
    same hash a document's k-gram gets); and the eval set each hash came from. Also returns the
    whole-text lengths k present, the document k-grams to look up."""
    hashes, set_ids, names, short_lens = [], [], [], set()
    for k, (name, files) in enumerate(eval_files.items()):
        names.append(name)
        texts = [t for item in eval_item_texts(files) for t in item]
        for s in range(0, len(texts), 2000):
            wh, counts = batch_word_hashes(texts[s:s + 2000])
            h, _ = batch_ngram_hashes(wh, counts, n)
            hashes.append(h)
            starts = np.cumsum(counts) - counts
            for i in np.flatnonzero((counts >= min_words) & (counts < n)):
                hashes.append(ngram_hashes(wh[starts[i]:starts[i] + counts[i]], int(counts[i])))
                short_lens.add(int(counts[i]))
        set_ids.append(np.full(sum(map(len, hashes)) - sum(map(len, set_ids)), k, dtype=np.int16))
    h, ids = np.concatenate(hashes), np.concatenate(set_ids)
    h, first = np.unique(h, return_index=True)
    return h, ids[first], names, sorted(short_lens)


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


def contaminating_set(word_hashes, word_counts, state, bitmap=None):
    """Per document: the eval set whose n-gram or whole short text it contains, or -1."""
    out = np.full(len(word_counts), -1, dtype=np.int16)
    for k in [state["eval_ngram"]] + list(state["eval_short_lens"]):
        h, counts = batch_ngram_hashes(word_hashes, word_counts, k)
        hit = eval_overlap(h, counts, state["eval_hashes"], state["eval_set_ids"], bitmap)
        out = np.where(out >= 0, out, hit)
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
        out["shingles"], out["set_sizes"] = shingle_values(sh), counts
        out["fingerprints"] = set_fingerprints(out["shingles"], counts)
        sig = minhash_signatures(sh, counts, _W["perm_a"], _W["perm_b"])
        out["sig"], out["keys"] = sig, lsh_band_keys(sig, _W["bands"], _W["rows"])
    if _W["eval_hashes"] is not None:
        out["contaminated"] = contaminating_set(wh, n_words, _W, _W["eval_bitmap"])
    if _W["segment_dedup"]:
        hs = [sorted_unique(np.array(line_hashes(t, _W["segment_min_chars"]), dtype=np.uint64)) if c
              else np.zeros(0, dtype=np.uint64) for t, c in zip(texts, count_lines)]
        out["line_counts"] = np.array([len(h) for h in hs], dtype=np.int32)
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


def compute_features(cfg, state, source_ids, scratch, skip_segments):
    """Pass 1 on all cores. Signatures, shingle sets and line hashes go to the scratch files; returns
    per-document arrays and the reader's counts."""
    counts = {}
    per_doc = {k: [] for k in ("meta", "words", "keys", "fingerprints", "set_sizes", "contaminated", "line_counts")}
    bar = progress(desc="pass 1: signatures", unit="doc")
    files = {k: open(p, "wb") for k, p in scratch.items()}
    try:
        with Pool(num_workers(cfg.workers), initializer=_init_worker, initargs=(state,)) as pool:
            batches = _batches(iter_corpus(cfg.inputs, cfg.text_field, counts), cfg.batch_docs, source_ids,
                               skip_segments)
            for m, out in ordered_map(pool, document_features, batches):
                per_doc["meta"].append(m)
                for k in ("words", "keys", "fingerprints", "set_sizes", "contaminated", "line_counts"):
                    if k in out:
                        per_doc[k].append(out[k])
                for k in ("sig", "shingles", "lines"):
                    if k in out:
                        files[k].write(out[k].tobytes())
                bar.update(len(m))
    finally:
        for f in files.values():
            f.close()
    bar.close()
    if not per_doc["meta"]:
        raise SystemExit(f"error: no documents in {cfg.inputs} (read counts: {_plain(counts)})")
    arrays = {k: np.concatenate(v) if v else None for k, v in per_doc.items()}
    n = len(arrays["meta"])
    if arrays["contaminated"] is None:
        arrays["contaminated"] = np.full(n, -1, dtype=np.int16)
    return arrays, counts


def near_duplicate_pairs(cfg, a, n, bands, rows, scratch):
    """Duplicate edges: exact copies (equal shingle fingerprints) joined to their group's first
    document, and LSH candidates among the groups' first documents whose exact Jaccard >= threshold."""
    info = {}
    rep = exact_copy_groups(a["fingerprints"])
    copies = np.flatnonzero(rep != np.arange(n))
    copy_pairs = np.stack([rep[copies], copies], axis=1)
    reps = np.flatnonzero(rep == np.arange(n))
    t0 = time.time()
    local, bucket_info = lsh_candidate_pairs(a["keys"][reps], cfg.lsh_max_bucket)
    candidates = reps[local]
    info["lsh_candidates_s"] = time.time() - t0
    t0 = time.time()
    offsets = np.concatenate([[0], np.cumsum(a["set_sizes"])])
    values = np.memmap(scratch["shingles"], dtype=np.uint32, mode="r") if offsets[-1] else np.zeros(0, np.uint32)
    jac = exact_jaccard(candidates, values, offsets)
    del values
    verified = candidates[jac >= cfg.threshold]
    info["verify_s"] = time.time() - t0
    info.update(exact_copies=int(len(copies)), candidate_pairs=int(len(candidates)),
                verified_pairs=int(len(verified)), **bucket_info)
    return np.concatenate([copy_pairs, verified]).astype(np.int64), info


def count_survivor_lines(cfg, line_counts, survivors, path):
    """The count-min sketch of the line hashes of the surviving documents, sized from their number."""
    n_items = int(line_counts[survivors].sum())
    sketch = CountMinSketch(cfg.segment_sketch_mb, items=n_items)
    ends = np.cumsum(line_counts.astype(np.int64))
    if ends[-1] == 0:
        return sketch
    lines = np.memmap(path, dtype=np.uint64, mode="r")
    step = 100_000
    for d0 in range(0, len(line_counts), step):
        d1 = min(d0 + step, len(line_counts))
        s0, s1 = ends[d0] - line_counts[d0], ends[d1 - 1]
        mask = np.repeat(survivors[d0:d1], line_counts[d0:d1])
        if mask.any():
            sketch.add(np.asarray(lines[s0:s1])[mask])
    return sketch


def write_survivors(cfg, survivors, words, sketch, skip_segments, per_source):
    """Pass 2: re-read the inputs in the same order; write the surviving documents, boilerplate lines
    removed, to out_dir/<source>/part_*.jsonl. Updates survivors, words and per_source in place."""
    writers = {s: JsonlWriter(os.path.join(cfg.out_dir, s), cfg.docs_per_file) for s in per_source}
    bar = progress(desc="pass 2: write", unit="doc", total=len(survivors))
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
                    st["dropped"]["segment_emptied"]["tokens"] += int(words[i])
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
    (duplicate edges, cluster roots, surviving documents, contaminating eval set per document)."""
    t_start, cpu_start, cpu_main_start = time.time(), _cpu_seconds(), _cpu_seconds(children=False)
    timings = {}
    os.makedirs(cfg.out_dir, exist_ok=True)
    sources = expand_inputs(cfg.inputs)  # fails early, with a clear line, on a missing input
    names = list(dict.fromkeys(s for s, _ in sources))
    source_ids = {s: i for i, s in enumerate(names)}
    bands, rows = ((cfg.bands, cfg.rows) if cfg.bands and cfg.rows
                   else choose_bands_rows(cfg.threshold, cfg.num_perm, min_recall=cfg.lsh_min_recall))
    assert bands * rows <= cfg.num_perm, "bands x rows must not exceed num_perm"
    perm_a, perm_b = minhash_permutations(cfg.num_perm, cfg.seed)
    eval_hashes = eval_set_ids = None
    eval_names, short_lens = [], []
    if cfg.decontaminate and cfg.evals:
        t0 = time.time()
        eval_hashes, eval_set_ids, eval_names, short_lens = eval_ngram_index(
            resolve_eval_files(cfg), cfg.eval_ngram, cfg.eval_min_words)
        timings["eval_index"] = time.time() - t0
        print(f"decontamination: {len(eval_hashes):,} {cfg.eval_ngram}-grams and short texts from {', '.join(eval_names)}")
    skip_segments = {s.strip() for s in cfg.segment_skip_sources.split(",") if s.strip()}
    state = dict(near_dedup=cfg.near_dedup, ngram=cfg.ngram, perm_a=perm_a, perm_b=perm_b, bands=bands, rows=rows,
                 eval_hashes=eval_hashes, eval_set_ids=eval_set_ids, eval_ngram=cfg.eval_ngram,
                 eval_short_lens=short_lens, segment_dedup=cfg.segment_dedup, segment_min_chars=cfg.segment_min_chars)

    t0 = time.time()
    scratch = {"sig": ".signatures.u32", "shingles": ".shingles.u32", "lines": ".lines.u64"}
    scratch = {k: os.path.join(cfg.out_dir, v) for k, v in scratch.items()}
    near = {}
    try:
        a, counts = compute_features(cfg, state, source_ids, scratch, skip_segments)
        meta, words, contaminated = a["meta"], a["words"], a["contaminated"]
        n = len(meta)
        source_of, score, length = meta[:, 0].astype(np.int64), meta[:, 1], meta[:, 2]
        timings["pass1_signatures"] = time.time() - t0
        pairs = np.zeros((0, 2), dtype=np.int64)
        if cfg.near_dedup:
            pairs, near = near_duplicate_pairs(cfg, a, n, bands, rows, scratch)
            timings["lsh_candidates"], timings["verify"] = near.pop("lsh_candidates_s"), near.pop("verify_s")
        t0 = time.time()
        roots = union_find_clusters(n, pairs)
        order = [s.strip() for s in cfg.priority.split(",") if s.strip()]
        rank_of_source = np.array([order.index(s) if s in order else len(order) + i for i, s in enumerate(names)])
        is_contaminated = contaminated >= 0
        keep = choose_keepers(roots, rank_of_source[source_of], score, length, is_contaminated)
        survivors = keep & ~is_contaminated
        timings["clusters"] = time.time() - t0
        sketch = None
        if cfg.segment_dedup:
            t0 = time.time()
            sketch = count_survivor_lines(cfg, a["line_counts"], survivors, scratch["lines"])
            timings["segment_count"] = time.time() - t0
    finally:
        for p in scratch.values():
            if os.path.exists(p):
                os.remove(p)

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
        "note": "tokens = normalized words (Unicode letters/digits, lowercased); exact BPE counts come from the "
                "tokenize step. A document both contaminated and a near-duplicate counts as decontaminated.",
        "config": asdict(cfg), "lsh": {"bands": bands, "rows": rows, "num_perm": cfg.num_perm},
        "totals": totals, "per_source": per_source,
        "decontaminated_by_eval": {name: int((contaminated == k).sum()) for k, name in enumerate(eval_names)},
        "near_dup": {**near, "clusters": int(sum(c for s, c in sizes.items() if s > 1)),
                     "cross_source_clusters": cross,
                     "cluster_size_histogram": {str(s): c for s, c in sorted(sizes.items())}},
        "segment_sketch_mb": round(sketch.table.nbytes / 2**20, 3) if sketch is not None else 0,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "docs_per_s": round(n / timings["total"], 1),
        # CPU seconds of this process and its (finished) workers: per-core speed even on a busy machine
        "cpu_s": round(_cpu_seconds() - cpu_start, 3),
        "cpu_s_main_process": round(_cpu_seconds(children=False) - cpu_main_start, 3),
        "peak_rss_mb": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024},
    }
    atomic_write(os.path.join(cfg.out_dir, "stats.json"), stats)
    d = totals["dropped"]
    print(f"dedup: {totals['docs_in']:,} -> {totals['docs_out']:,} docs ({totals['tokens_in']:,} -> "
          f"{totals['tokens_out']:,} words); near-dup {d['near_duplicate']['docs']:,}, decontaminated "
          f"{d['decontaminated']['docs']:,}, malformed {d['malformed']['docs']}, empty {d['empty']['docs']}, "
          f"boilerplate lines {totals['segment_lines_removed']:,} (documents emptied {d['segment_emptied']['docs']}); "
          f"{timings['total']:.1f}s -> {cfg.out_dir}")
    return {"stats": stats, "pairs": pairs, "roots": roots, "keep": survivors, "sources": names,
            "source_of": source_of, "contaminated": contaminated}


def _cpu_seconds(children=True):
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + (kids.ru_utime + kids.ru_stime if children else 0.0)


def _plain(counts):
    return {s: dict(c) for s, c in counts.items()}


if __name__ == "__main__":
    from common import parse_config
    run(parse_config(DedupConfig()))
