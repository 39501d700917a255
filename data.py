"""
The real-data path, up to token shards: download -> quality gates -> (dedup.py) -> tokenize.

    python data.py download --sources=fineweb_edu,finemath --max_shards=2      # -> out/raw/<source>/...
    python data.py gate --inputs=out/raw                                       # -> out/gated/<source>/
    python dedup.py --inputs=out/gated                                         # -> out/dedup/<source>/
    python data.py tokenize --inputs=out/dedup --tokenizer=train               # -> out/data/ (shards)

Every stage streams: documents are read one record (or one parquet batch) at a time and written as
they go, so memory does not grow with the corpus. Inputs can be parquet, JSONL (optionally .gz) or
plain text, local or downloaded; an input directory with sub-directories is one source per
sub-directory, otherwise one source named after the directory (a file: named after the file).

Token shards, the format pretrain.py reads. A shard directory holds
    meta.json            {"tokenizer": fingerprint, "dtype": "uint16"|"uint32", "vocab_size", "bos_id",
                          "shards": {"train": [...], "val": [...]}, "tokens": {"train": n, "val": n}}
    tokenizer.json       the tokenizer itself (tokenizer.py)
    train_000000.bin ... flat arrays of token ids, each document preceded by <|bos|>
pretrain.py memory-maps the .bin files and samples random windows from them, so a corpus of any
size costs no RAM.
"""
import dataclasses
import fnmatch
import gzip
import json
import os
import string
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

SHARD_TOKENS = 100_000_000  # tokens per .bin file (200 MB as uint16)

# -----------------------------------------------------------------------------
# Sources that can be downloaded by name from the Hugging Face Hub. Each is a dataset repo, a glob
# over its file list, the text column, and whether the prose quality gates make sense for it
# (code fails "lines end in punctuation" by nature, so code skips them).
SOURCES = {
    # FineWeb-Edu, the 10B-token sample: ~14 parquet shards of ~2 GB; rows carry score / int_score
    "fineweb_edu": dict(repo="HuggingFaceFW/fineweb-edu", pattern="sample/10BT/*.parquet", text="text", gates=True),
    # math web pages classified as high quality (score 4-5 of 5)
    "finemath": dict(repo="HuggingFaceTB/finemath", pattern="finemath-4plus/*.parquet", text="text", gates=True),
    # permissively licensed Python files, de-duplicated and cleaned by CodeParrot
    "code": dict(repo="codeparrot/codeparrot-clean", pattern="*.json.gz", text="content", gates=False),
}
# mixtures by name: `--sources=edu_math_code` is the same as `--sources=fineweb_edu,finemath,code`
MIXTURES = {
    "edu_math_code": ["fineweb_edu", "finemath", "code"],
    "math_code": ["finemath", "code"],
}
DATA_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".txt", ".md")
EXTRA_FIELDS = ("id", "url", "score", "int_score")  # carried from the raw records to later stages


@dataclass
class DataConfig:
    # download
    sources: str = "fineweb_edu"  # names in SOURCES / MIXTURES, comma-separated
    max_shards: int = 1           # files per source to download (sorted by name; 0 = all)
    # io
    inputs: str = ""              # comma-separated files/dirs; default: the previous stage's out_dir
    out_dir: str = ""             # default: out/raw, out/gated, out/data for download, gate, tokenize
    text_field: str = "text"      # column / JSON key holding the document ("content" is tried too)
    text_sep: str = "<|endoftext|>"  # document separator inside plain-text files
    max_doc_chars: int = 100_000  # plain-text files without separators are cut into pieces this big
    docs_per_file: int = 100_000  # JSONL outputs roll over to a new part file after this many docs
    # gates (Gopher, Rae et al. 2021, sec. A.1.1; FineWeb, Penedo et al. 2024). Each has a flag.
    min_int_score: int = 3        # FineWeb-Edu's educational score, applied where rows have it (0 = off)
    gate_length: bool = True
    min_words: int = 50
    max_words: int = 100_000
    gate_word_length: bool = True
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    gate_symbols: bool = True
    max_symbol_ratio: float = 0.1    # ('#' + '...' + '…') per word
    gate_line_punct: bool = True
    min_line_punct: float = 0.12     # fraction of lines ending in terminal punctuation (FineWeb)
    gate_dup_lines: bool = True
    max_dup_line_frac: float = 0.30  # lines that repeat an earlier line
    max_dup_line_char_frac: float = 0.20
    gate_dup_ngrams: bool = True     # top 2/3/4-gram and duplicated 5..10-gram char fractions
    # tokenize
    tokenizer: str = "train"      # path to a tokenizer.json | "gpt2" | "train" (rustbpe on the inputs)
    vocab_size: int = 32768       # for --tokenizer=train (counts the 4 special tokens)
    tokenizer_train_chars: int = 200_000_000  # how much of the corpus trains the tokenizer
    val_every: int = 200          # every N-th document (starting with the first) goes to val
    shard_tokens: int = SHARD_TOKENS
    batch_docs: int = 1024        # documents per encode_batch call
    workers: int = 0              # 0 = all cores


# -----------------------------------------------------------------------------
# A tiny --key=value parser over a config dataclass (one per script).

def parse_cli(cfg_cls, argv):
    """Returns (positional args, cfg). Values are coerced to the field's type; an unknown key is an error."""
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    cfg, positional = cfg_cls(), []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"usage: --key=value, keys of {cfg_cls.__name__} and their defaults:")
            for f in fields.values():
                print(f"  --{f.name}={getattr(cfg, f.name)!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key}. Known: {', '.join('--' + k for k in fields)}")
        typ = type(getattr(cfg, key))
        if typ is bool:
            if not eq:
                val = "true"
            if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SystemExit(f"error: --{key} takes true/false, not {val!r}")
            value = val.lower() in ("1", "true", "yes")
        else:
            try:
                value = typ(val)
            except ValueError:
                raise SystemExit(f"error: --{key} takes a {typ.__name__}, not {val!r}")
        setattr(cfg, key, value)
    return positional, cfg


def num_workers(n):
    return n if n > 0 else (os.cpu_count() or 1)


def ordered_map(pool, fn, items, window=None):
    """For (arg, context) items, yield (context, fn(arg)) in order, fn running on the pool, with at
    most `window` calls in flight. (Pool.imap reads its whole input ahead of the workers, which would
    hold the corpus in memory; the context stays in this process and is not pickled.)"""
    window = window or 2 * pool._processes + 2
    pending = deque()
    for arg, ctx in items:
        pending.append((ctx, pool.apply_async(fn, (arg,))))
        if len(pending) >= window:
            ctx, res = pending.popleft()
            yield ctx, res.get()
    while pending:
        ctx, res = pending.popleft()
        yield ctx, res.get()


# -----------------------------------------------------------------------------
# Download (Hugging Face Hub). `hub` is any object with list_repo_files / hf_hub_download, so the
# tests can stand a local folder in for the network.

def _real_hub():
    import huggingface_hub
    return huggingface_hub


def expand_source_names(spec):
    names = []
    for s in [s.strip() for s in spec.split(",") if s.strip()]:
        for name in MIXTURES.get(s, [s]):
            if name not in SOURCES:
                raise SystemExit(f"error: unknown source {name!r}. Known: {', '.join(list(SOURCES) + list(MIXTURES))}"
                                 f" (or put local parquet/jsonl/txt files in a folder and pass it as --inputs)")
            if name not in names:
                names.append(name)
    return names


def download_source(name, out_dir, max_shards, hub=None):
    """Fetch the first `max_shards` files (sorted) of source `name` into out_dir/name/. Files already
    there are kept, so an interrupted download resumes. Returns the local paths."""
    hub = hub or _real_hub()
    spec = SOURCES[name]
    dest = os.path.join(out_dir, name)
    try:
        files = hub.list_repo_files(spec["repo"], repo_type="dataset")
    except Exception as e:  # no network, no such repo, gated repo without a token...
        have = _data_files(dest) if os.path.isdir(dest) else []
        if have:  # offline re-run: go on with what an earlier download (or the user) put there
            print(f"note: cannot reach the Hub ({type(e).__name__}); using the {len(have)} files already in {dest}")
            return have
        raise SystemExit(f"error: cannot list {spec['repo']} on the Hugging Face Hub ({type(e).__name__}: {e}). "
                         f"Without a network, put parquet/jsonl/txt files under {dest}/ and run the gate "
                         f"step on them: `python data.py gate --inputs={out_dir}`.")
    files = sorted(f for f in files if fnmatch.fnmatch(f, spec["pattern"]))
    if not files:
        raise SystemExit(f"error: no files in {spec['repo']} match {spec['pattern']!r}; the repo layout "
                         f"changed: fix SOURCES[{name!r}] in data.py")
    if max_shards > 0:
        files = files[:max_shards]
    paths = []
    for f in files:
        local = os.path.join(dest, f)
        if not os.path.exists(local):
            try:
                local = hub.hf_hub_download(spec["repo"], f, repo_type="dataset", local_dir=dest)
            except Exception as e:
                raise SystemExit(f"error: downloading {spec['repo']}/{f} failed ({type(e).__name__}: {e}). "
                                 f"Re-run to resume; files already in {dest} are kept.")
        paths.append(local)
    # the gate step reads the source's text column and gate setting from here
    with open(os.path.join(dest, "source.json"), "w") as fh:
        json.dump(dict(spec, name=name, files=files), fh, indent=1)
    return paths


# -----------------------------------------------------------------------------
# Readers. Each yields dicts {"text": str, ...EXTRA_FIELDS present}; malformed records and empty
# documents are counted in `counts` (a dict) and skipped, never fatal.

def expand_inputs(spec):
    """'a,b,name=c' -> [(source, [files])]. A directory with sub-directories is one source per
    sub-directory; a directory of files is one source named after it; a file is named after itself."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, eq, path = item.partition("=")
        if not eq:
            name, path = None, item
        if not os.path.exists(path):
            raise SystemExit(f"error: input {path} does not exist. Download first (`python data.py download`, "
                             f"or `make data`), or pass --inputs=<existing files or folders>.")
        if os.path.isfile(path):
            out.append((name or _stem(path), [path]))
            continue
        subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
        top_files = _data_files(path, recursive=False)
        if subdirs and not name:
            out += [(_stem(f), [f]) for f in top_files]
            out += [(d, _data_files(os.path.join(path, d))) for d in subdirs]
        else:
            out.append((name or os.path.basename(os.path.normpath(path)), _data_files(path)))
    out = [(n, fs) for n, fs in out if fs]
    if not out:
        raise SystemExit(f"error: no {'/'.join(DATA_EXTENSIONS)} files under {spec}")
    return out


def _stem(path):
    base = os.path.basename(path)
    for ext in DATA_EXTENSIONS:
        if base.endswith(ext):
            return base[:-len(ext)]
    return os.path.splitext(base)[0]


def _data_files(folder, recursive=True):
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(DATA_EXTENSIONS)]
        if not recursive:
            break
    return found


def source_settings(files):
    """The SOURCES entry saved next to downloaded files (text column, gates on/off), if any."""
    for f in files[:1]:
        d = os.path.dirname(f)
        while d and d != os.path.dirname(d):
            p = os.path.join(d, "source.json")
            if os.path.exists(p):
                with open(p) as fh:
                    return json.load(fh)
            d = os.path.dirname(d)
    return {}


def read_documents(path, text_field="text", counts=None, text_sep="<|endoftext|>", max_doc_chars=100_000):
    counts = counts if counts is not None else defaultdict(int)
    if path.endswith(".parquet"):
        gen = _read_parquet(path, text_field, counts)
    elif path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        gen = _read_jsonl(path, text_field, counts)
    else:
        gen = ({"text": t} for t in _read_text(path, text_sep, max_doc_chars))
    for rec in gen:
        if not rec["text"].strip():
            counts["empty"] += 1
            continue
        counts["read"] += 1
        yield rec


def _read_jsonl(path, text_field, counts):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes: json.loads decodes UTF-8 itself, faster than a text file
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # bad JSON or bad UTF-8
                counts["malformed"] += 1
                continue
            text = None
            if isinstance(rec, dict):
                text = rec.get(text_field, rec.get("text", rec.get("content")))
            if not isinstance(text, str):
                counts["malformed"] += 1
                continue
            out = {"text": text}
            out.update((k, rec[k]) for k in EXTRA_FIELDS if k in rec)
            yield out


def _read_parquet(path, text_field, counts):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    col = next((c for c in (text_field, "text", "content") if c in names), None)
    if col is None:
        raise SystemExit(f"error: {path} has no text column {text_field!r} (columns: {names}); pass --text_field=")
    extra = [c for c in EXTRA_FIELDS if c in names]
    for batch in pf.iter_batches(batch_size=1024, columns=[col] + extra):  # one row batch in memory at a time
        cols = {c: batch.column(c).to_pylist() for c in [col] + extra}
        for i, text in enumerate(cols[col]):
            if text is None:
                counts["malformed"] += 1
                continue
            rec = {"text": text}
            rec.update((c, cols[c][i]) for c in extra)
            yield rec


def _read_text(path, sep, max_doc_chars):
    """Documents separated by `sep`, read 1 MB at a time. A file without separators (a book) is cut at
    a newline into pieces of at most max_doc_chars, so no document outgrows memory."""
    buf = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(1 << 20)
            buf += chunk
            while True:
                i = buf.find(sep) if sep else -1
                if i >= 0:
                    yield buf[:i]
                    buf = buf[i + len(sep):]
                elif len(buf) > max_doc_chars:
                    cut = buf.rfind("\n", 0, max_doc_chars)
                    cut = cut if cut > 0 else max_doc_chars
                    yield buf[:cut]
                    buf = buf[cut:]
                else:
                    break
            if not chunk:
                break
    if buf:
        yield buf


def iter_corpus(inputs, text_field="text", counts=None, **kw):
    """(source, record) over all inputs in a fixed order. counts: {source: {"read", "malformed", "empty"}}."""
    counts = counts if counts is not None else {}
    for source, files in expand_inputs(inputs):
        c = counts.setdefault(source, defaultdict(int))
        field = source_settings(files).get("text", text_field)
        for path in files:
            for rec in read_documents(path, field, c, **kw):
                yield source, rec


class JsonlWriter:
    """out_dir/part_00000.jsonl, part_00001.jsonl, ... rolled every docs_per_file documents."""

    def __init__(self, out_dir, docs_per_file=100_000):
        self.out_dir, self.docs_per_file = out_dir, docs_per_file
        self.f, self.n, self.part = None, 0, 0
        os.makedirs(out_dir, exist_ok=True)

    def write(self, rec):
        if self.f is None or self.n >= self.docs_per_file:
            self.close()
            self.f = open(os.path.join(self.out_dir, f"part_{self.part:05d}.jsonl"), "w", encoding="utf-8")
            self.part, self.n = self.part + 1, 0
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.n += 1

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


# -----------------------------------------------------------------------------
# Text primitives shared with dedup.py: normalized words, their 64-bit hashes, and n-gram hashes.
# Normalized words: lowercased UTF-8, ASCII punctuation and control bytes turned into spaces, split.

_SEPARATORS = bytes(range(33)) + string.punctuation.encode()
_NORMALIZE = bytes.maketrans(_SEPARATORS, b" " * len(_SEPARATORS))
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial combine is a bijection per position
_BYTE_MULT = 0x100000001B3                     # odd, so invertible mod 2^64
_powers_cache = [np.ones(1, np.uint64), np.ones(1, np.uint64)]


def normalize_words(text):
    """The normalized words of a text, as bytes."""
    return text.lower().encode("utf-8", "replace").translate(_NORMALIZE).split()


def hash_words(words):
    """xxhash64 of each word of a list (bytes): for one document at a time, as the gates need."""
    import xxhash
    return np.fromiter(map(xxhash.xxh64_intdigest, words), dtype=np.uint64, count=len(words))


def mix64(h):
    """splitmix64 finalizer: spreads a polynomial hash's bits so any 32 of them are uniform."""
    h = h ^ (h >> np.uint64(30))
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


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
    joined = b"\0".join([t.lower().encode("utf-8", "replace").translate(_NORMALIZE) for t in texts]) + b"\0"
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


def ngram_hashes(word_hashes, n):
    """64-bit hashes of every n consecutive words, vectorized: n shifted multiply-adds over the array."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = word_hashes[:m].copy()
        for k in range(1, n):
            h *= _NGRAM_MULT
            h += word_hashes[k:k + m]
        return mix64(h)


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
# Quality gates. Each takes a Doc (the text split once into lines and words) and the config, and
# returns True to keep. Thresholds are Gopher's (and FineWeb's for line punctuation).

TERMINAL_PUNCT = (".", "!", "?", '"', "'", "…", ":", ";", ")")


class Doc:
    def __init__(self, text):
        self.text = text
        self.words = text.split()
        self.lines = [l.strip() for l in text.split("\n") if l.strip()]


def gate_length(doc, cfg):
    """Too short to be a document (menus, captions) or too long to be prose (dumps, logs)."""
    return cfg.min_words <= len(doc.words) <= cfg.max_words


def gate_word_length(doc, cfg):
    """Mean word length outside [3, 10]: lists of codes, hashes, or run-together text."""
    if not doc.words:
        return False
    mean = sum(map(len, doc.words)) / len(doc.words)
    return cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len


def gate_symbols(doc, cfg):
    """Hashtag walls and truncated snippets ('...'), per word."""
    n_sym = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
    return n_sym / max(len(doc.words), 1) <= cfg.max_symbol_ratio


def gate_line_punct(doc, cfg):
    """Pages whose lines mostly do not end a sentence are navigation, lists, or tables (FineWeb)."""
    if not doc.lines:
        return False
    ends = sum(l.endswith(TERMINAL_PUNCT) for l in doc.lines)
    return ends / len(doc.lines) >= cfg.min_line_punct


def gate_dup_lines(doc, cfg):
    """Lines repeated inside one document: templated pages, spam."""
    seen, dup, dup_chars = set(), 0, 0
    for l in doc.lines:
        if l in seen:
            dup += 1
            dup_chars += len(l)
        seen.add(l)
    total_chars = sum(map(len, doc.lines)) or 1
    return (dup / max(len(doc.lines), 1) <= cfg.max_dup_line_frac
            and dup_chars / total_chars <= cfg.max_dup_line_char_frac)


# Gopher's n-gram repetition thresholds: the most frequent n-gram (n=2..4) may cover at most this
# fraction of the characters; words inside any repeated n-gram (n=5..10) likewise.
TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def gate_dup_ngrams(doc, cfg):
    """Repetition inside one document (Gopher): the top 2/3/4-gram covers too many characters, or too
    many characters sit inside 5..10-grams that occur more than once. Boilerplate, spam, lists."""
    words = [w.encode() for w in doc.words]
    if len(words) < 2:
        return True
    wh = hash_words(words)
    wlen = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    cum = np.concatenate([[0], np.cumsum(wlen)])
    total = cum[-1] or 1
    for n, limit in TOP_NGRAM_MAX.items():
        h = ngram_hashes(wh, n)
        if len(h) < 2:
            continue
        s = np.sort(h)
        run_start = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
        runs = np.diff(np.append(run_start, len(s)))
        k = runs.argmax()
        if runs[k] > 1:
            first = int(np.argmax(h == s[run_start[k]]))
            if runs[k] * (cum[first + n] - cum[first]) / total > limit:
                return False
    # a repeated (n+1)-gram contains a repeated n-gram, so the covered characters shrink as n grows:
    # once they are under the smallest limit, the larger n cannot fail
    for n, limit in DUP_NGRAM_MAX.items():
        h = ngram_hashes(wh, n)
        if len(h) < 2:
            break
        s = np.sort(h)
        dup_vals = s[1:][s[1:] == s[:-1]]
        if len(dup_vals) == 0:
            break
        starts = np.flatnonzero(np.isin(h, dup_vals))
        covered = np.zeros(len(words) + 1, dtype=np.int64)  # +1 at a start, -1 past its end
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + n, -1)
        frac = wlen[np.cumsum(covered)[:-1] > 0].sum() / total
        if frac > limit:
            return False
        if frac <= min(DUP_NGRAM_MAX.values()):
            break
    return True


GATES = [  # (name, function, config flag); applied in this order, the first failure counts
    ("length", gate_length, "gate_length"),
    ("word_length", gate_word_length, "gate_word_length"),
    ("symbols", gate_symbols, "gate_symbols"),
    ("line_punct", gate_line_punct, "gate_line_punct"),
    ("dup_lines", gate_dup_lines, "gate_dup_lines"),
    ("dup_ngrams", gate_dup_ngrams, "gate_dup_ngrams"),
]


def first_failed_gate(rec, cfg, prose=True):
    """Name of the first gate `rec` fails, or None. int_score applies wherever the row has one."""
    if cfg.min_int_score > 0 and rec.get("int_score") is not None and rec["int_score"] < cfg.min_int_score:
        return "int_score"
    if not prose:
        return None
    doc = Doc(rec["text"])
    for name, fn, flag in GATES:
        if getattr(cfg, flag) and not fn(doc, cfg):
            return name
    return None


def _gate_batch(args):
    recs, cfg, prose = args
    return [first_failed_gate(r, cfg, prose) for r in recs]


def gate_corpus(cfg):
    """Stream every input source through the gates into out_dir/<source>/part_*.jsonl, on all cores."""
    from multiprocessing import Pool
    from tqdm import tqdm
    inputs = cfg.inputs or "out/raw"
    out_dir = cfg.out_dir or "out/gated"
    stats = {}
    with Pool(num_workers(cfg.workers)) as pool:
        for source, files in expand_inputs(inputs):
            settings = source_settings(files)
            field, prose = settings.get("text", cfg.text_field), settings.get("gates", True)
            counts = defaultdict(int)
            st = stats[source] = {"docs_in": 0, "tokens_in": 0, "docs_out": 0, "tokens_out": 0, "dropped": {}}
            writer = JsonlWriter(os.path.join(out_dir, source), cfg.docs_per_file)

            def batches():
                batch = []
                for path in files:
                    for rec in read_documents(path, field, counts, cfg.text_sep, cfg.max_doc_chars):
                        batch.append(rec)
                        if len(batch) == cfg.batch_docs:
                            yield (batch, cfg, prose), batch
                            batch = []
                yield (batch, cfg, prose), batch

            bar = tqdm(desc=f"gate {source}", unit="doc", disable=None)
            for batch, verdicts in ordered_map(pool, _gate_batch, batches()):
                for rec, failed in zip(batch, verdicts):
                    n_tok = len(rec["text"].split())
                    st["docs_in"] += 1
                    st["tokens_in"] += n_tok
                    if failed:
                        d = st["dropped"].setdefault(failed, {"docs": 0, "tokens": 0})
                        d["docs"] += 1
                        d["tokens"] += n_tok
                    else:
                        writer.write(rec)
                        st["docs_out"] += 1
                        st["tokens_out"] += n_tok
                bar.update(len(batch))
            bar.close()
            writer.close()
            st["malformed"], st["empty"] = counts["malformed"], counts["empty"]
    stats["_note"] = "tokens = whitespace-separated words; a document counts under the first gate it fails"
    _write_json(os.path.join(out_dir, "gate_stats.json"), stats)
    for source, st in stats.items():
        if source != "_note":
            print(f"gate {source}: {st['docs_in']} -> {st['docs_out']} docs; dropped "
                  f"{ {k: v['docs'] for k, v in st['dropped'].items()} }, malformed {st['malformed']}, empty {st['empty']}")
    return stats


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Token shards.

def token_dtype(vocab_size):
    return np.uint16 if vocab_size < 2**16 else np.uint32


class ShardWriter:
    """Appends documents (bos + ids) to {split}_NNNNNN.bin files of about shard_tokens tokens each.
    A document is never split across files; each file appears atomically (temp + rename)."""

    def __init__(self, tok, out_dir, split, shard_tokens=SHARD_TOKENS):
        os.makedirs(out_dir, exist_ok=True)
        _check_meta_tokenizer(out_dir, tok)  # before any file is overwritten
        self.tok, self.out_dir, self.split, self.shard_tokens = tok, out_dir, split, shard_tokens
        self.dtype = token_dtype(tok.vocab_size)
        self.names, self.buf, self.n_buf, self.total = [], [], 0, 0

    def add(self, ids):
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[0] = self.tok.bos_id
        arr[1:] = ids
        self.buf.append(arr)
        self.n_buf += len(arr)
        self.total += len(arr)
        if self.n_buf >= self.shard_tokens:
            self.flush()

    def flush(self):
        if not self.n_buf:
            return
        name = f"{self.split}_{len(self.names):06d}.bin"
        tmp = os.path.join(self.out_dir, name + ".tmp")
        np.concatenate(self.buf).tofile(tmp)
        os.replace(tmp, os.path.join(self.out_dir, name))
        self.names.append(name)
        self.buf, self.n_buf = [], 0

    def close(self):
        self.flush()
        _update_meta(self.out_dir, self.tok, self.split, self.names, self.total)
        return self.total


def write_shards(token_lists, tok, out_dir, split, shard_tokens=SHARD_TOKENS):
    """Write an iterable of token-id lists (one per document) as shards of `split`.
    Returns the number of tokens written. Files appear atomically (temp + rename)."""
    w = ShardWriter(tok, out_dir, split, shard_tokens)
    for ids in token_lists:
        w.add(ids)
    return w.close()


def _update_meta(out_dir, tok, split, names, total):
    path = os.path.join(out_dir, "meta.json")
    meta = _check_meta_tokenizer(out_dir, tok) or {"shards": {}, "tokens": {}}
    meta.update(tokenizer=tok.fingerprint, tokenizer_name=tok.name, vocab_size=tok.vocab_size,
                bos_id=tok.bos_id, dtype=np.dtype(token_dtype(tok.vocab_size)).name)
    meta["shards"][split] = names
    meta["tokens"][split] = int(total)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, path)


def _check_meta_tokenizer(out_dir, tok):
    path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta.get("tokenizer") != tok.fingerprint:
        raise SystemExit(f"error: {out_dir} already holds shards of tokenizer {meta.get('tokenizer')}; "
                         f"this tokenizer is {tok.fingerprint}. Write to an empty directory.")
    return meta


def load_shards(data_dir, split, expect_tokenizer=None):
    """Memory-map the shards of `split`; returns a list of 1-D numpy arrays (read-only)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: no token shards in {data_dir} (meta.json missing). "
                         f"Make them first, e.g. `make data` or `python tasks.py --out_dir={data_dir}`.")
    with open(path) as f:
        meta = json.load(f)
    if expect_tokenizer is not None and meta["tokenizer"] != expect_tokenizer:
        raise SystemExit(f"error: shards in {data_dir} use tokenizer {meta['tokenizer']} but the model uses "
                         f"{expect_tokenizer}. Re-tokenize the data with the model's tokenizer "
                         f"(its tokenizer.json) or pretrain from scratch on these shards.")
    names = meta["shards"].get(split, [])
    if not names:
        raise SystemExit(f"error: {data_dir} has no '{split}' shards")
    return [np.memmap(os.path.join(data_dir, n), dtype=meta["dtype"], mode="r") for n in names]


def sample_batch(shards, batch_size, seq_len, rng):
    """Random (x, y) windows of seq_len+1 tokens, drawn across shards in proportion to their size.
    `rng` is a numpy Generator so that a resumed run draws the same batches."""
    n_starts = np.array([len(s) - seq_len for s in shards])  # windows of seq_len+1 tokens each shard holds
    if n_starts.max() <= 0:
        raise SystemExit(f"error: shards hold fewer than seq_len+1 = {seq_len + 1} tokens")
    n_starts = np.clip(n_starts, 0, None)
    which = rng.choice(len(shards), size=batch_size, p=n_starts / n_starts.sum())
    starts = [rng.integers(0, n_starts[w]) for w in which]
    rows = np.stack([np.asarray(shards[w][s:s + seq_len + 1], dtype=np.int64) for w, s in zip(which, starts)])
    return rows[:, :-1], rows[:, 1:]


def get_tokenizer(cfg, inputs, out_dir):
    from tokenizer import gpt2_tokenizer, load_tokenizer, train_tokenizer
    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer()
    if cfg.tokenizer == "train":
        def sample():
            n = 0
            for _, rec in iter_corpus(inputs, cfg.text_field):
                yield rec["text"]
                n += len(rec["text"])
                if n >= cfg.tokenizer_train_chars:
                    return
        t0 = time.time()
        tok = train_tokenizer(sample(), cfg.vocab_size)
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        print(f"trained tokenizer {tok.name} ({tok.fingerprint}) in {time.time() - t0:.0f}s")
        return tok
    return load_tokenizer(cfg.tokenizer)


def tokenize_corpus(cfg):
    """Encode every document of the inputs with tiktoken on all cores into train/val shards."""
    from tqdm import tqdm
    inputs = cfg.inputs or "out/dedup"
    out_dir = cfg.out_dir or "out/data"
    tok = get_tokenizer(cfg, inputs, out_dir)
    threads = num_workers(cfg.workers)
    writers = {s: ShardWriter(tok, out_dir, s, cfg.shard_tokens) for s in ("train", "val")}
    counts, n_docs = {}, 0
    bar = tqdm(desc="tokenize", unit="doc", disable=None)

    def encode(batch):
        nonlocal n_docs
        for ids in tok.encode_batch(batch, num_threads=threads):  # tiktoken: Rust threads, GIL released
            writers["val" if n_docs % cfg.val_every == 0 else "train"].add(ids)
            n_docs += 1
        bar.update(len(batch))

    batch = []
    for _, rec in iter_corpus(inputs, cfg.text_field, counts, text_sep=cfg.text_sep, max_doc_chars=cfg.max_doc_chars):
        batch.append(rec["text"])
        if len(batch) == cfg.batch_docs * threads:
            encode(batch)
            batch = []
    encode(batch)
    bar.close()
    totals = {s: w.close() for s, w in writers.items()}
    skipped = {s: {k: c[k] for k in ("malformed", "empty") if c.get(k)} for s, c in counts.items()}
    print(f"tokenized {n_docs} docs with {tok.name} ({tok.fingerprint}): train {totals['train']:,} tokens, "
          f"val {totals['val']:,} tokens -> {out_dir}" + (f"; skipped {skipped}" if any(skipped.values()) else ""))
    return totals


def main(argv):
    args, cfg = parse_cli(DataConfig, argv)
    if len(args) != 1 or args[0] not in ("download", "gate", "tokenize"):
        raise SystemExit("usage: python data.py {download|gate|tokenize} [--key=value ...]  (--help lists keys)")
    if args[0] == "download":
        out_dir = cfg.out_dir or "out/raw"
        for name in expand_source_names(cfg.sources):
            paths = download_source(name, out_dir, cfg.max_shards)
            print(f"{name}: {len(paths)} files in {os.path.join(out_dir, name)}")
    elif args[0] == "gate":
        gate_corpus(cfg)
    else:
        tokenize_corpus(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
