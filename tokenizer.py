"""
BPE tokenizer: rustbpe trains the merges, tiktoken encodes with them; or a Hugging Face byte-level
BPE `tokenizer.json` (SmolLM2, Qwen2.5, DeepSeek-R1-Distill-Qwen) read into the same tiktoken form,
ids equal to the Hugging Face tokenizer's.

One small object wraps a tiktoken.Encoding plus the special tokens the pipeline needs, named by
role (`roles`: role -> token):

    role        nanoforge-trained   imported (SmolLM2 / Qwen2.5 Instruct)
    bos         <|bos|>             the model's bos_token, else <|endoftext|>, else eos: document boundary
    user        <|user|>            (none: the chat template writes the turns)
    assistant   <|assistant|>       (none)
    end         <|end|>             the chat template's end-of-turn token (<|im_end|>)

Stop tokens for generation: `tok.stop_ids` (the end-of-turn token first, then the model's other
eos ids); `tok.end_id` is the end-of-turn token alone. A chat template (Jinja, as in transformers)
travels with the tokenizer and renders conversations (`apply_chat_template`); without one the
project's own `<|bos|><|user|>...<|end|><|assistant|>` format is used (tasks.py).

It is saved as JSON (merges, split pattern, specials, roles, template) inside every checkpoint and
every shard directory; `fingerprint` is a hash of that JSON, and stages compare fingerprints to
refuse data or checkpoints made with a different tokenizer. A nanoforge-trained tokenizer's JSON is
byte-for-byte what it was before roles existed, so its fingerprint, and old checkpoints, still hold.
"""
import base64
import hashlib
import json
import os
import unicodedata

import tiktoken

# Document boundary and chat turns. Every nanoforge tokenizer, trained or gpt2, carries these four.
SPECIAL_TOKENS = ["<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]
DEFAULT_ROLES = dict(zip(["bos", "user", "assistant", "end"], SPECIAL_TOKENS))

# GPT-4-style split, but digits one at a time: small models learn arithmetic far more easily
# when "128" is always the three tokens 1 2 8 rather than a merge that depends on the number.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

# Hugging Face's ByteLevel pre-tokenizer with use_regex=True (GPT-2's split).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then ByteLevel(use_regex) as one regex: every digit alone, and a run of
# whitespace before a digit kept whole (Digits cuts the text there, so GPT-2's `\s+(?!\S)` sees the
# run at the end of its piece).
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


class Tokenizer:
    def __init__(self, name, pattern, mergeable_ranks, specials=None, roles=None, stop=None,
                 chat_template=None, normalizer=None, hf_tokens=None):
        """specials: token -> id (default: SPECIAL_TOKENS after the merges); roles: role -> token;
        stop: extra stop tokens after the end-of-turn one; hf_tokens: bos_token/eos_token/pad_token/unk_token
        as a Hugging Face tokenizer_config names them (template variables, export)."""
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        self.legacy = specials is None
        self.special = specials if specials is not None else {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.roles = dict(roles if roles is not None else DEFAULT_ROLES)
        self.stop = list(stop or [])
        self.chat_template = chat_template
        self.normalizer = normalizer  # None or "NFC"
        self.hf_tokens = dict(hf_tokens or {})
        if normalizer not in (None, "NFC"):
            raise ValueError(f"unsupported normalizer {normalizer!r} (None or 'NFC')")
        self.vocab_size = max(max(mergeable_ranks.values()), max(self.special.values())) + 1
        # tiktoken needs all 256 bytes as tokens; a vocabulary without some (SmolLM2 has no token for a few
        # control bytes) gets placeholders above the vocabulary that encode() drops, as Hugging Face's BPE
        # without an unk token drops what it cannot encode
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in mergeable_ranks]
        self._dropped_from = self.vocab_size if missing else None
        ranks = {**mergeable_ranks, **{b: self.vocab_size + i for i, b in enumerate(missing)}}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special)
        role_id = {r: self.special[t] for r, t in self.roles.items() if t is not None}
        self.bos_id = role_id.get("bos")
        self.user_id = role_id.get("user")
        self.assistant_id = role_id.get("assistant")
        self.end_id = role_id.get("end")
        self.stop_ids = list(dict.fromkeys([self.end_id] + [self.special[t] for t in self.stop]))
        self._special_ids = frozenset(self.special.values())
        self._template = None
        self.fingerprint = hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def _normalize(self, text):
        return unicodedata.normalize("NFC", text) if self.normalizer == "NFC" else text

    def encode(self, text, specials=False):
        """Token ids of text. By default special tokens in the text are encoded as plain text, never as
        control tokens. specials=True matches them (what a Hugging Face tokenizer does, and what a
        rendered chat template needs)."""
        text = self._normalize(text)
        ids = self.enc.encode(text, allowed_special="all") if specials else self.enc.encode_ordinary(text)
        return self._drop_missing(ids)

    def encode_batch(self, texts, num_threads=8):
        rows = self.enc.encode_ordinary_batch([self._normalize(t) for t in texts], num_threads=num_threads)
        return rows if self._dropped_from is None else [self._drop_missing(r) for r in rows]

    def _drop_missing(self, ids):
        if self._dropped_from is None:
            return ids
        return [i for i in ids if i < self._dropped_from]

    def decode(self, ids):
        """Text of ids, special tokens skipped (skip_special_tokens=True)."""
        return self.enc.decode([i for i in ids if i not in self._special_ids])

    def encode_text_bytes(self, text):
        """The bytes encode() tokenizes (after normalization)."""
        return self._normalize(text).encode()

    def token_bytes(self, i):
        return self.enc.decode_single_token_bytes(i)

    # -- chat template -------------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, **kwargs):
        """As transformers' tokenizer.apply_chat_template: render messages with the Jinja template,
        then tokenize the text with special tokens matched and nothing added around it."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name} has no chat template")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        variables = {k: v for k, v in self.hf_tokens.items() if v is not None}
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **variables, **kwargs)
        return self.encode(text, specials=True) if tokenize else text

    # -- storage -------------------------------------------------------------------------------

    def to_json(self):
        ranks = {base64.b64encode(k).decode(): v for k, v in self.mergeable_ranks.items()}
        if self.legacy and self.roles == DEFAULT_ROLES and not (self.stop or self.chat_template or self.normalizer
                                                               or self.hf_tokens):
            # exactly the format of tokenizers trained before roles existed: same fingerprint
            return json.dumps({"name": self.name, "pattern": self.pattern, "special": SPECIAL_TOKENS,
                               "mergeable_ranks": ranks}, sort_keys=True)
        return json.dumps({"name": self.name, "pattern": self.pattern, "specials": self.special,
                           "roles": self.roles, "stop": self.stop, "chat_template": self.chat_template,
                           "normalizer": self.normalizer, "hf_tokens": self.hf_tokens,
                           "mergeable_ranks": ranks}, sort_keys=True)

    def save(self, path):
        from common import atomic_write  # here, not at the top: common imports this module
        atomic_write(path, self.to_json())


def compile_chat_template(source):
    """The template compiled the way transformers compiles it (chat_template_utils): a sandboxed Jinja
    environment with trim_blocks/lstrip_blocks, loop controls, its tojson (no HTML escaping),
    raise_exception and strftime_now, and a pass-through {% generation %} block. Jinja (a torch
    dependency already) is the only way to render arbitrary Hub templates exactly."""
    import datetime
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):  # {% generation %}...{% endgeneration %} marks assistant text; render as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def tokenizer_from_json(text):
    d = json.loads(text)
    ranks = {base64.b64decode(k): v for k, v in d["mergeable_ranks"].items()}
    if "specials" not in d:
        if d.get("special") != SPECIAL_TOKENS:
            raise ValueError(f"tokenizer special tokens {d.get('special')} differ from {SPECIAL_TOKENS}")
        return Tokenizer(d["name"], d["pattern"], ranks)
    return Tokenizer(d["name"], d["pattern"], ranks, specials=d["specials"], roles=d["roles"], stop=d["stop"],
                     chat_template=d["chat_template"], normalizer=d["normalizer"], hf_tokens=d["hf_tokens"])


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
    # named after the size actually learned: a small corpus runs out of merges before vocab_size
    return Tokenizer(f"{name}{len(ranks) + len(SPECIAL_TOKENS)}", bpe.get_pattern(), ranks)


def gpt2_tokenizer():
    """tiktoken's gpt2 merges (needs the network once, then tiktoken's cache) plus our specials."""
    base = tiktoken.get_encoding("gpt2")
    return Tokenizer("gpt2", base._pat_str, base._mergeable_ranks)


def check_same_tokenizer(expected_fp, found_fp, what):
    if expected_fp != found_fp:
        raise SystemExit(f"error: {what} was made with tokenizer {found_fp}, but this run uses {expected_fp}. "
                         f"Re-tokenize the data (or retrain from scratch) with one tokenizer throughout.")


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json <-> this tokenizer

def bytes_to_unicode():
    """GPT-2's byte <-> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _token_text(t):
    """A tokenizer_config special token: a string or an AddedToken dict."""
    return t.get("content") if isinstance(t, dict) else t


def _hf_pattern(pre, where):
    """The split regex a Hugging Face byte-level pre-tokenizer applies, as one tiktoken pattern."""
    kind = (pre or {}).get("type")
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return GPT2_DIGITS_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return steps[0]["pattern"]["Regex"]
    raise SystemExit(f"error: {where}: pre-tokenizer {json.dumps(pre)[:200]} is not supported (byte-level BPE "
                     f"with ByteLevel, Digits+ByteLevel or Split(regex)+ByteLevel only)")


def tokenizer_from_hf(model_dir, name=None):
    """A Hugging Face byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json, chat template,
    generation_config.json) as this project's tokenizer, ids equal to the Hugging Face tokenizer's."""
    where = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(where):
        raise SystemExit(f"error: {model_dir} has no tokenizer.json (only fast byte-level BPE tokenizers import)")
    with open(where) as f:
        tj = json.load(f)

    def read(name):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        return {}

    tc, gc = read("tokenizer_config.json"), read("generation_config.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise SystemExit(f"error: {where}: model type {model.get('type')} (byte_fallback={model.get('byte_fallback')})"
                         f" is not byte-level BPE; SentencePiece-style tokenizers (TinyLlama, Llama-2) do not import")
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise SystemExit(f"error: {where}: normalizer {norm.get('type')} is not supported (none or NFC)")
    pattern = _hf_pattern(tj.get("pre_tokenizer"), where)
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    for t in tj.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise SystemExit(f"error: {where}: added token {t['content']!r} strips or matches single words; unsupported")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added_ids = set(specials.values())
    ranks = {}
    for tok_str, i in model["vocab"].items():
        if i in added_ids:
            continue
        try:
            ranks[bytes(byte_of[c] for c in tok_str)] = i
        except KeyError:
            raise SystemExit(f"error: {where}: vocabulary entry {tok_str!r} is not byte-level")
    # tiktoken merges the adjacent pair whose concatenation has the lowest id; BPE the pair listed first.
    # They agree when the merges list is in id order of the merged tokens.
    merged = [(m.split(" ", 1) if isinstance(m, str) else m) for m in model.get("merges", [])]
    prev = -1
    reachable = {b for b in ranks if len(b) == 1}
    for a, b in merged:
        t = bytes(byte_of[c] for c in a + b)
        if ranks.get(t, -1) < prev:
            raise SystemExit(f"error: {where}: merge {a!r} + {b!r} is out of id order; tiktoken cannot reproduce it")
        prev = ranks[t]
        reachable.add(t)
    ranks = {t: i for t, i in ranks.items() if t in reachable}  # tokens no merge makes are never produced
    template = tc.get("chat_template")
    if os.path.exists(os.path.join(model_dir, "chat_template.jinja")):
        with open(os.path.join(model_dir, "chat_template.jinja")) as f:
            template = f.read()
    if isinstance(template, list):  # named templates: the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    hf_tokens = {k: _token_text(tc.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for k, v in hf_tokens.items():
        if v is not None and v not in specials:
            raise SystemExit(f"error: {model_dir}: {k} {v!r} is not an added token of tokenizer.json")
    eos = hf_tokens["eos_token"]
    # the end-of-turn token: what the template writes right after an assistant's words
    end = _end_of_turn(template, specials, hf_tokens) if template else None
    end = end or eos or ("<|endoftext|>" if "<|endoftext|>" in specials else None)
    if end is None:
        raise SystemExit(f"error: {model_dir}: no eos_token and no chat template: cannot tell where generation stops")
    bos = hf_tokens["bos_token"] or ("<|endoftext|>" if "<|endoftext|>" in specials else eos or end)
    gen_eos = gc.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    tok_of = {i: t for t, i in specials.items()}
    stop = [t for t in dict.fromkeys([eos] + [tok_of.get(i) for i in gen_eos]) if t is not None and t != end]
    vocab = max(max(ranks.values()), max(specials.values())) + 1
    return Tokenizer(name or f"hf-bpe{vocab}", pattern, ranks, specials=specials,
                     roles={"bos": bos, "end": end}, stop=stop, chat_template=template,
                     normalizer=norm and "NFC", hf_tokens=hf_tokens)


def _end_of_turn(template, specials, hf_tokens):
    probe = "Zq7xW3 answer"
    text = compile_chat_template(template).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
        add_generation_prompt=False, tools=None, documents=None,
        **{k: v for k, v in hf_tokens.items() if v is not None})
    if probe not in text:
        return None
    rest = text[text.rindex(probe) + len(probe):]
    found = [t for t in specials if rest.startswith(t)]
    return max(found, key=len) if found else None


def tokenizer_to_hf(tok):
    """(tokenizer.json, tokenizer_config.json) dicts that transformers' AutoTokenizer loads with the same
    ids. The merges are recovered from the ranks the way transformers' TikTokenConverter does: every
    split of a token into two tokens is a merge, ordered by the merged token's id."""
    enc = bytes_to_unicode()

    def s(b):
        return "".join(enc[x] for x in b)

    vocab, merges = {}, []
    for t, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1]):
        vocab[s(t)] = r
        if len(t) > 1:
            local = [(t[:i], t[i:]) for i in range(1, len(t))
                     if t[:i] in tok.mergeable_ranks and t[i:] in tok.mergeable_ranks]
            local.sort(key=lambda p: (tok.mergeable_ranks[p[0]], tok.mergeable_ranks[p[1]]))
            merges += [[s(a), s(b)] for a, b in local]
    for t, i in tok.special.items():
        vocab[t] = i
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(tok.special.items(), key=lambda kv: kv[1])]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if tok.normalizer == "NFC" else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges}}
    hf = dict(tok.hf_tokens)
    if tok.legacy:  # nanoforge's own: a template equal to tasks.py's <|bos|><|user|>...<|end|><|assistant|> format
        hf = {"bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|end|>", "unk_token": None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30, "add_bos_token": False, "add_eos_token": False,
              "chat_template": tok.chat_template or (LEGACY_CHAT_TEMPLATE if tok.legacy else None),
              **{k: v for k, v in hf.items() if v is not None}}
    return tokenizer_json, config


# tasks.py's chat format as a Jinja template, for export: one user turn then the assistant's.
LEGACY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ raise_exception('only user and assistant turns') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
