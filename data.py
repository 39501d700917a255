"""
The real-data path, up to token shards: download -> quality gates -> (dedup.py) -> tokenize.

    python data.py download --sources=fineweb_edu,finemath --max_shards=2      # -> out/raw/<source>/...
    python data.py gate --inputs=out/raw                                       # -> out/gated/<source>/
    python dedup.py --inputs=out/gated                                         # -> out/dedup/<source>/
    python data.py tokenize --inputs=out/dedup --tokenizer=train               # -> out/data/ (shards)

Each command has its own config dataclass (DownloadConfig, GateConfig, TokenizeConfig), parsed by
common.parse_config; `python data.py gate --help` lists its keys.

What each step reads and writes:
    download   the Hub -> out_dir/<source>/<files as in the repo> + source.json (text column, gates on/off)
    gate       --inputs (parquet / .jsonl[.gz] / .txt) -> out_dir/<source>/part_*.jsonl, out_dir/gate_stats.json
    tokenize   --inputs -> out_dir/meta.json, tokenizer.json, train_*.bin, val_*.bin (format: shards.py)

--inputs is a comma-separated list of files and folders; `name=path` names the source that path is
(a folder with sub-folders is one source per sub-folder, a folder of files one source named after
it, a file one source named after the file). Every stage streams: documents are read one record (or
one parquet batch) at a time and written as they go, so memory does not grow with the corpus.
A truncated .jsonl.gz / .parquet or a JSONL file that is not UTF-8 stops the step with one line
naming the file; a malformed JSON line or an empty document is counted and skipped.
"""
import fnmatch
import gzip
import json
import os
import re
import sys
import time
import unicodedata
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from common import atomic_open, atomic_write, progress
from shards import SHARD_TOKENS, ShardWriter

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
class DownloadConfig:
    sources: str = "fineweb_edu"  # names in SOURCES / MIXTURES, comma-separated
    max_shards: int = 1           # files per source to download (sorted by name; 0 = all)
    out_dir: str = "out/raw"      # files land in out_dir/<source>/


@dataclass
class GateConfig:
    inputs: str = "out/raw"       # comma-separated files/dirs; name=path names a source (see expand_inputs)
    out_dir: str = "out/gated"    # -> out_dir/<source>/part_*.jsonl + gate_stats.json
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
    max_symbol_ratio: float = 0.1    # '#' per word, and ('...' + '…') per word
    gate_line_punct: bool = True
    min_line_punct: float = 0.12     # fraction of lines ending in . ' " ! ? must exceed this (FineWeb)
    gate_dup_lines: bool = True
    max_dup_line_frac: float = 0.30  # lines (and paragraphs) that repeat an earlier one
    max_dup_line_char_frac: float = 0.20  # their characters / the text's
    gate_dup_ngrams: bool = True     # top 2/3/4-gram and duplicated 5..10-gram char fractions
    batch_docs: int = 1024        # documents per worker task
    workers: int = 0              # 0 = all cores


@dataclass
class TokenizeConfig:
    inputs: str = "out/dedup"     # comma-separated files/dirs; name=path names a source
    out_dir: str = "out/data"     # -> meta.json, tokenizer.json, train_*.bin, val_*.bin (shards.py)
    text_field: str = "text"
    text_sep: str = "<|endoftext|>"
    max_doc_chars: int = 100_000
    tokenizer: str = "train"      # path to a tokenizer.json | "gpt2" | "train" (rustbpe on the inputs)
    vocab_size: int = 32768       # for --tokenizer=train (counts the 4 special tokens); a small corpus may learn fewer
    tokenizer_train_chars: int = 200_000_000  # how much of the corpus trains the tokenizer
    val_every: int = 200          # every N-th document (starting with the first) goes to val ...
    val_min_docs: int = 100       # ... but more often on a small corpus, so that val has this many (at most 10%)
    shard_tokens: int = SHARD_TOKENS
    batch_docs: int = 1024        # documents per encode_batch call
    workers: int = 0              # 0 = all cores


COMMANDS = {"download": DownloadConfig, "gate": GateConfig, "tokenize": TokenizeConfig}


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
    atomic_write(os.path.join(dest, "source.json"), dict(spec, name=name, files=files))
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


def _damaged(path, e):
    return SystemExit(f"error: {path} is truncated or damaged ({type(e).__name__}: {e}); an interrupted "
                      f"download? Delete it and download it again (`python data.py download` fetches only "
                      f"missing files), or leave it out of --inputs.")


def _read_jsonl(path, text_field, counts):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:  # bytes: json.loads decodes UTF-8 itself, faster than a text file
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except UnicodeDecodeError:
                    raise SystemExit(f"error: {path} line {line_no} is not UTF-8 text. Convert the file to "
                                     f"UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out of --inputs.")
                except ValueError:  # bad JSON
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
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _damaged(path, e)


def _read_parquet(path, text_field, counts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
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
    except (pa.ArrowException, OSError) as e:
        raise _damaged(path, e)


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
    """out_dir/part_00000.jsonl, part_00001.jsonl, ... rolled every docs_per_file documents. Each part
    appears whole when it is closed (common.atomic_open), so an interrupted step leaves no half part."""

    def __init__(self, out_dir, docs_per_file=100_000):
        self.out_dir, self.docs_per_file = out_dir, docs_per_file
        self.f, self.n, self.part, self._ctx = None, 0, 0, None
        os.makedirs(out_dir, exist_ok=True)

    def write(self, rec):
        if self.f is None or self.n >= self.docs_per_file:
            self.close()
            self._ctx = atomic_open(os.path.join(self.out_dir, f"part_{self.part:05d}.jsonl"), "wb")
            self.f = self._ctx.__enter__()
            self.part, self.n = self.part + 1, 0
        self.f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self.n += 1

    def close(self):
        if self.f is not None:
            self._ctx.__exit__(None, None, None)
            self.f, self._ctx = None, None


# -----------------------------------------------------------------------------
# Words: the one definition shared by the gates, dedup.py's shingles and its decontamination.
# Typographic quotes, dashes, ellipses and spaces are mapped to their ASCII forms and the text is
# NFKC-normalised (full-width letters, ligatures); then a word is a maximal run of Unicode letters and
# digits (str.isalnum), everything else separates words. ASCII text (most of it) takes a bytes.translate
# fast path that gives the same words. Combining marks (Mn/Mc, e.g. Devanagari vowel signs) count as
# separators, as in Python's \w; consistent on both sides of every comparison.

_TYPOGRAPHIC = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u02bc\u00b4\u0060", "'"),   # single quotes, prime, acute
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb\u2039\u203a", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2043", "-"),  # hyphens, dashes, minus
    "\u2026": "...",
    **dict.fromkeys("\u00a0\u2002\u2003\u2009\u200a\u202f\u205f\u3000", " "),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad", ""),            # zero-width, soft hyphen
})
_ASCII_NON_WORD = bytes(c for c in range(128) if not chr(c).isalnum())
_TO_SPACE = bytes.maketrans(_ASCII_NON_WORD, b" " * len(_ASCII_NON_WORD))
_NON_WORD = re.compile(r"[\W_]+")
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial combine is a bijection per position


def normalize_text(text):
    """Typographic characters as ASCII (curly quotes, dashes, ellipsis, odd spaces), then NFKC."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text.translate(_TYPOGRAPHIC))


def word_bytes(text, lower=True):
    """The text as UTF-8 bytes in which every non-word character is a space: .split() gives the words."""
    if not text.isascii():
        text = normalize_text(text)
        text = _NON_WORD.sub(" ", text.lower() if lower else text)
    elif lower:
        text = text.lower()
    return text.encode("utf-8", "replace").translate(_TO_SPACE)


def split_words(text):
    """The words of a text, case kept (the gates' words)."""
    return word_bytes(text, lower=False).decode("utf-8", "replace").split()


def normalize_words(text):
    """The lowercased words of a text, as bytes (dedup's and decontamination's words)."""
    return word_bytes(text).split()


def hash_words(words):
    """xxhash64 of each word of a list (str or bytes): for one document at a time, as the gates need."""
    import xxhash
    return np.fromiter((xxhash.xxh64_intdigest(w.encode() if isinstance(w, str) else w) for w in words),
                       dtype=np.uint64, count=len(words))


def mix64(h):
    """splitmix64 finalizer: spreads a polynomial hash's bits so any 32 of them are uniform."""
    h = h ^ (h >> np.uint64(30))
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


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


# -----------------------------------------------------------------------------
# Quality gates. Each takes a Doc and the config and returns True to keep. The statistics are those of
# Gopher (Rae et al. 2021, sec. A.1.1 and table A1) as datatrove implements them
# (GopherQualityFilter, GopherRepetitionFilter), and FineWeb's line-punctuation rule (FineWebQualityFilter).
# One deviation everywhere: a word is a run of letters/digits (split_words), where datatrove runs a
# word tokenizer and then drops punctuation-only tokens for the word count and mean length; so
# "don't" is two words here ("don", "t") and ("do", "n't") there. The text is typographically
# normalised first (curly quotes, dashes, "…" -> "..."), as for dedup.

LINE_END_PUNCT = (".", "'", '"', "!", "?")  # FineWeb's stop_chars


class Doc:
    def __init__(self, text):
        self.text = normalize_text(text)
        self.words = split_words(self.text)


def gate_length(doc, cfg):
    """Gopher: between 50 and 100,000 words. Menus and captions; dumps and logs."""
    return cfg.min_words <= len(doc.words) <= cfg.max_words


def gate_word_length(doc, cfg):
    """Gopher: mean word length (characters) within [3, 10]. Lists of codes, hashes, run-together text."""
    if not doc.words:
        return False
    mean = sum(map(len, doc.words)) / len(doc.words)
    return cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len


def gate_symbols(doc, cfg):
    """Gopher: at most 0.1 '#' per word, and at most 0.1 ellipses ('...' or '…') per word, each on its
    own. (datatrove divides by all tokens, punctuation included; Gopher says words, as here.)"""
    n = max(len(doc.words), 1)
    return (doc.text.count("#") / n <= cfg.max_symbol_ratio
            and (doc.text.count("...") + doc.text.count("…")) / n <= cfg.max_symbol_ratio)


def gate_line_punct(doc, cfg):
    """FineWeb: drop when the fraction of lines (split on "\\n", empty ones included) that end in
    . ' " ! ? is at most 0.12. Navigation, lists, tables."""
    lines = doc.text.split("\n")
    return sum(l.endswith(LINE_END_PUNCT) for l in lines) / len(lines) > cfg.min_line_punct


def duplicate_fractions(parts, text_len):
    """Gopher's duplicate line / paragraph statistics: (elements that repeat an earlier element) / all
    elements, and the characters of those repeats / all characters of the text. The first occurrence
    is not counted."""
    seen, dup, dup_chars = set(), 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / max(len(parts), 1), dup_chars / max(text_len, 1)


def gate_dup_lines(doc, cfg):
    """Gopher: duplicate paragraphs (split on 2+ newlines) <= 30% of paragraphs and <= 20% of the
    characters; duplicate lines (split on newlines) likewise. Templated pages, spam."""
    paras = re.split(r"\n{2,}", doc.text.strip())
    frac, char_frac = duplicate_fractions(paras, len(doc.text))
    if frac > cfg.max_dup_line_frac or char_frac > cfg.max_dup_line_char_frac:
        return False
    frac, char_frac = duplicate_fractions(re.split(r"\n+", doc.text), len(doc.text))
    return frac <= cfg.max_dup_line_frac and char_frac <= cfg.max_dup_line_char_frac


# Gopher's n-gram repetition thresholds (table A1)
TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def top_ngram_char_frac(words, n, text_len, wh=None):
    """Characters of the most frequent n-gram (its words joined by spaces) times its count, over the
    text's characters (datatrove's find_top_duplicate; ties go to the n-gram seen first)."""
    wh = hash_words(words) if wh is None else wh
    h = ngram_hashes(wh, n)
    if len(h) == 0:
        return 0.0
    vals, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = counts.max()
    i = int(first[counts == top].min())
    return (sum(len(w) for w in words[i:i + n]) + n - 1) * int(top) / max(text_len, 1)


def dup_ngram_char_frac(words, n, text_len, wh=None):
    """Characters (spaces not counted) of the n-grams that repeat an earlier one, over the text's
    characters: datatrove's find_all_duplicate, a left-to-right scan that jumps past a repeat so
    overlapping repeats are not counted twice; the first occurrence is not counted."""
    wh = hash_words(words) if wh is None else wh
    h = ngram_hashes(wh, n)
    if len(h) < 2 or len(np.unique(h)) == len(h):
        return 0.0
    seen, repeated, i, h = set(), 0, 0, h.tolist()
    while i < len(h):
        if h[i] in seen:
            repeated += sum(len(w) for w in words[i:i + n])
            i += n
        else:
            seen.add(h[i])
            i += 1
    return repeated / max(text_len, 1)


def gate_dup_ngrams(doc, cfg):
    """Gopher: the top 2/3/4-gram covers at most 20/18/16% of the characters, and repeated 5..10-grams
    at most 15..10%. Boilerplate, spam, lists."""
    if len(doc.words) < 2:
        return True
    wh, n_chars = hash_words(doc.words), len(doc.text)
    return (all(top_ngram_char_frac(doc.words, n, n_chars, wh) <= lim for n, lim in TOP_NGRAM_MAX.items())
            and all(dup_ngram_char_frac(doc.words, n, n_chars, wh) <= lim for n, lim in DUP_NGRAM_MAX.items()))


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
    inputs, out_dir = cfg.inputs, cfg.out_dir
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

            bar = progress(desc=f"gate {source}", unit="doc")
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
    atomic_write(os.path.join(out_dir, "gate_stats.json"), stats)
    for source, st in stats.items():
        if source != "_note":
            print(f"gate {source}: {st['docs_in']} -> {st['docs_out']} docs; dropped "
                  f"{ {k: v['docs'] for k, v in st['dropped'].items()} }, malformed {st['malformed']}, empty {st['empty']}")
    return stats


def get_tokenizer(cfg, inputs):
    """(tokenizer, number of documents when the training pass read the whole corpus, else None).
    Nothing is written here: tokenizer.json is written with the shards' meta.json."""
    from tokenizer import gpt2_tokenizer, load_tokenizer, train_tokenizer
    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer(), None
    if cfg.tokenizer != "train":
        return load_tokenizer(cfg.tokenizer), None
    seen = {"docs": 0, "complete": True}

    def sample():
        n = 0
        for _, rec in iter_corpus(inputs, cfg.text_field, text_sep=cfg.text_sep, max_doc_chars=cfg.max_doc_chars):
            if n >= cfg.tokenizer_train_chars:
                seen["complete"] = False
                return
            yield rec["text"]
            seen["docs"] += 1
            n += len(rec["text"])

    t0 = time.time()
    tok = train_tokenizer(sample(), cfg.vocab_size)
    print(f"trained tokenizer {tok.name} ({tok.fingerprint}) in {time.time() - t0:.0f}s")
    if tok.vocab_size < cfg.vocab_size:
        print(f"warning: the corpus filled only {tok.vocab_size:,} of the {cfg.vocab_size:,} requested vocabulary "
              f"entries (it has no more merges to learn); the tokenizer is {tok.name}. Pass a smaller "
              f"--vocab_size or more text for a full one.")
    return tok, (seen["docs"] if seen["complete"] else None)


def val_period(cfg, inputs, n_docs=None):
    """Every how many documents one goes to val: cfg.val_every, unless the corpus is too small for
    val_min_docs validation documents that way; then as often as needed, but at most 1 in 10."""
    limit = cfg.val_every * cfg.val_min_docs
    if n_docs is None:  # count, stopping as soon as the corpus is known to be big enough
        n_docs = 0
        for _ in iter_corpus(inputs, cfg.text_field, text_sep=cfg.text_sep, max_doc_chars=cfg.max_doc_chars):
            n_docs += 1
            if n_docs >= limit:
                break
    if n_docs >= limit:
        return cfg.val_every
    return max(min(cfg.val_every, n_docs // max(cfg.val_min_docs, 1)), min(10, cfg.val_every), 1)


def tokenize_corpus(cfg):
    """Encode every document of the inputs with tiktoken on all cores into train/val shards. A shard
    directory of another tokenizer is refused before anything is written."""
    inputs, out_dir = cfg.inputs, cfg.out_dir
    expand_inputs(inputs)  # a missing input: one line, before a long tokenizer training
    tok, n_docs = get_tokenizer(cfg, inputs)
    writers = {s: ShardWriter(tok, out_dir, s, cfg.shard_tokens) for s in ("train", "val")}  # checks out_dir
    every = val_period(cfg, inputs, n_docs)
    threads = num_workers(cfg.workers)
    counts, n_docs = {}, 0
    bar = progress(desc="tokenize", unit="doc")

    def encode(batch):
        nonlocal n_docs
        for ids in tok.encode_batch(batch, num_threads=threads):  # tiktoken: Rust threads, GIL released
            writers["val" if n_docs % every == 0 else "train"].add(ids)
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
    print(f"tokenized {n_docs} docs with {tok.name} ({tok.fingerprint}, {tok.vocab_size:,} tokens): "
          f"train {totals['train']:,} tokens, val {totals['val']:,} tokens ({(n_docs + every - 1) // every} docs, "
          f"1 in {every}) -> {out_dir}" + (f"; skipped {skipped}" if any(skipped.values()) else ""))
    return totals


USAGE = ("usage: python data.py {download|gate|tokenize} [--key=value ...]  "
         "(python data.py <command> --help lists the keys)")


def main(argv):
    from common import parse_config
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        raise SystemExit(f"error: {'unknown command ' + repr(argv[0]) if argv else 'no command'}. {USAGE}")
    cmd, cfg = argv[0], parse_config(COMMANDS[argv[0]](), argv[1:])
    if cmd == "download":
        for name in expand_source_names(cfg.sources):
            paths = download_source(name, cfg.out_dir, cfg.max_shards)
            print(f"{name}: {len(paths)} files in {os.path.join(cfg.out_dir, name)}")
    elif cmd == "gate":
        gate_corpus(cfg)
    else:
        tokenize_corpus(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
