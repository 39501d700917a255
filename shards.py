"""
Token shards: the on-disk format pretrain.py reads, its writer and its memory-mapped loader.

A shard directory holds
    meta.json            {"tokenizer": fingerprint, "tokenizer_name", "dtype": "uint16"|"uint32", "vocab_size",
                          "bos_id", "shards": {"train": [...], "val": [...]}, "tokens": {"train": n, "val": n}}
    tokenizer.json       the tokenizer itself (tokenizer.py)
    train_000000.bin ... flat arrays of token ids, each document preceded by <|bos|>
pretrain.py memory-maps the .bin files and samples random windows from them, so a corpus of any size
costs no RAM. data.py (tokenize) and tasks.py write them.
"""
import json
import os

import numpy as np

from common import atomic_write

SHARD_TOKENS = 100_000_000  # tokens per .bin file (200 MB as uint16)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size < 2**16 else np.uint32


class ShardWriter:
    """Appends documents (bos + ids) to {split}_NNNNNN.bin files of about shard_tokens tokens each.
    A document is never split across files; each file appears atomically (temp + rename)."""

    def __init__(self, tok, out_dir, split, shard_tokens=SHARD_TOKENS):
        check_meta_tokenizer(out_dir, tok)  # before any file is written
        os.makedirs(out_dir, exist_ok=True)
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
    meta = check_meta_tokenizer(out_dir, tok) or {"shards": {}, "tokens": {}}
    meta.update(tokenizer=tok.fingerprint, tokenizer_name=tok.name, vocab_size=tok.vocab_size,
                bos_id=tok.bos_id, dtype=np.dtype(token_dtype(tok.vocab_size)).name)
    meta["shards"][split] = names
    meta["tokens"][split] = int(total)
    tok.save(os.path.join(out_dir, "tokenizer.json"))  # atomic (common.atomic_write)
    atomic_write(os.path.join(out_dir, "meta.json"), meta)


def read_meta(data_dir):
    """meta.json of a shard directory, or None where there is none; a damaged one is one clear line."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        ok = (isinstance(meta, dict) and isinstance(meta.get("shards"), dict) and "tokenizer" in meta
              and meta.get("dtype") in ("uint16", "uint32") and isinstance(meta.get("vocab_size"), int))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise SystemExit(f"error: {path} is damaged or not a shard index (need tokenizer, dtype, vocab_size, "
                         f"shards). Re-run `python data.py tokenize --out_dir={data_dir}` into an empty directory.")
    return meta


def check_meta_tokenizer(out_dir, tok):
    """The existing meta.json of out_dir (None if none); refuses a different tokenizer."""
    meta = read_meta(out_dir)
    if meta is not None and meta.get("tokenizer") != tok.fingerprint:
        raise SystemExit(f"error: {out_dir} already holds shards of tokenizer {meta.get('tokenizer')}; "
                         f"this tokenizer is {tok.fingerprint}. Write to an empty directory (nothing was changed).")
    return meta


def load_shards(data_dir, split, expect_tokenizer=None):
    """Memory-map the shards of `split`; returns a list of 1-D numpy arrays (read-only). A missing or
    damaged shard (wrong byte count, token ids >= vocab_size) is one clear line."""
    meta = read_meta(data_dir)
    if meta is None:
        raise SystemExit(f"error: no token shards in {data_dir} (meta.json missing). "
                         f"Make them first, e.g. `make data` or `python tasks.py --out_dir={data_dir}`.")
    if expect_tokenizer is not None and meta["tokenizer"] != expect_tokenizer:
        raise SystemExit(f"error: shards in {data_dir} use tokenizer {meta['tokenizer']} but the model uses "
                         f"{expect_tokenizer}. Re-tokenize the data with the model's tokenizer "
                         f"(its tokenizer.json) or pretrain from scratch on these shards.")
    names = meta["shards"].get(split, [])
    if not names:
        raise SystemExit(f"error: {data_dir} has no '{split}' shards")
    dtype = np.dtype(meta["dtype"])
    redo = f"Re-run `python data.py tokenize --out_dir=<an empty directory>` to rebuild the shards."
    out = []
    for n in names:
        path = os.path.join(data_dir, n)
        if not os.path.exists(path):
            raise SystemExit(f"error: shard {path} (listed in meta.json) is missing. {redo}")
        size = os.path.getsize(path)
        if size == 0 or size % dtype.itemsize:
            raise SystemExit(f"error: shard {path} has {size} bytes, not a whole number of {meta['dtype']} tokens "
                             f"(truncated or damaged). {redo}")
        arr = np.memmap(path, dtype=dtype, mode="r")
        top = int(arr.max())  # one sequential read: ~0.1 s per 100M tokens
        if top >= meta["vocab_size"]:
            raise SystemExit(f"error: shard {path} holds token id {top} >= vocab_size {meta['vocab_size']} "
                             f"(damaged, or made with another tokenizer). {redo}")
        out.append(arr)
    return out


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
