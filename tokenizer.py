"""
BPE tokenizer: rustbpe trains the merges, tiktoken encodes with them.

One small object wraps a tiktoken.Encoding plus the four special tokens the pipeline needs.
It is saved as JSON (merges, split pattern, specials) inside every checkpoint and every
shard directory; `fingerprint` is a hash of that JSON, and stages compare fingerprints to
refuse data or checkpoints made with a different tokenizer.
"""
import base64
import hashlib
import json
import os

import tiktoken

# Document boundary and chat turns. Every tokenizer, trained or gpt2, carries these four.
SPECIAL_TOKENS = ["<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]

# GPT-4-style split, but digits one at a time: small models learn arithmetic far more easily
# when "128" is always the three tokens 1 2 8 rather than a merge that depends on the number.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")


class Tokenizer:
    def __init__(self, name, pattern, mergeable_ranks):
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        self.special = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special)
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.bos_id = self.special["<|bos|>"]
        self.user_id = self.special["<|user|>"]
        self.assistant_id = self.special["<|assistant|>"]
        self.end_id = self.special["<|end|>"]
        self.fingerprint = hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def encode(self, text):
        # special tokens in raw text are encoded as plain text, never as control tokens
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < len(self.mergeable_ranks)])

    def to_json(self):
        ranks = {base64.b64encode(k).decode(): v for k, v in self.mergeable_ranks.items()}
        return json.dumps({"name": self.name, "pattern": self.pattern, "special": SPECIAL_TOKENS,
                           "mergeable_ranks": ranks}, sort_keys=True)

    def save(self, path):
        from common import atomic_write  # here, not at the top: common imports this module
        atomic_write(path, self.to_json())


def tokenizer_from_json(text):
    d = json.loads(text)
    if d.get("special") != SPECIAL_TOKENS:
        raise ValueError(f"tokenizer special tokens {d.get('special')} differ from {SPECIAL_TOKENS}")
    ranks = {base64.b64decode(k): v for k, v in d["mergeable_ranks"].items()}
    return Tokenizer(d["name"], d["pattern"], ranks)


def load_tokenizer(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: train one with `python tokenizer.py` "
                                f"or point at a checkpoint/shard directory that has tokenizer.json")
    with open(path) as f:
        return tokenizer_from_json(f.read())


def train_tokenizer(texts, vocab_size, name="bpe"):
    """Train byte-level BPE on an iterable of strings. vocab_size counts the specials."""
    import rustbpe
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    assert n_merged >= 256, "vocab_size must leave room for the 256 byte tokens"
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    return Tokenizer(f"{name}{vocab_size}", bpe.get_pattern(), ranks)


def gpt2_tokenizer():
    """tiktoken's gpt2 merges (needs the network once, then tiktoken's cache) plus our specials."""
    base = tiktoken.get_encoding("gpt2")
    return Tokenizer("gpt2", base._pat_str, base._mergeable_ranks)


def check_same_tokenizer(expected_fp, found_fp, what):
    if expected_fp != found_fp:
        raise SystemExit(f"error: {what} was made with tokenizer {found_fp}, but this run uses {expected_fp}. "
                         f"Re-tokenize the data (or retrain from scratch) with one tokenizer throughout.")
