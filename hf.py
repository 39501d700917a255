"""
Hugging Face checkpoints in and out: Llama-family (LlamaForCausalLM: SmolLM / SmolLM2) and
Qwen2-family (Qwen2ForCausalLM: Qwen2.5, Qwen2.5-Math, DeepSeek-R1-Distill-Qwen) models with
byte-level BPE tokenizers and their chat templates.

    python hf.py import --from=DIR_OR_REPO --out_dir=out/smollm2      # -> out/smollm2/ckpt (stage "import")
    python hf.py export --from=out/sft --out_dir=out/sft-hf            # -> config.json, model.safetensors, ...

import: config.json is read for every field that changes the math (rope_theta, rms_norm_eps,
tie_word_embeddings, Qwen2's q/k/v biases, head counts, vocab size, max positions); anything nanoforge
does not compute (rope scaling, a sliding window in use, other activations, o_proj/MLP biases, a
head_dim that is not hidden/heads) is refused in one line that names it. The safetensors files
(one, or shards with model.safetensors.index.json) are read tensor by tensor into the checkpoint's
state dict, so at most one full copy of the weights is in memory (plus one tensor). The written
checkpoint is an ordinary one: `--init_from` takes it in sft.py, grpo.py and eval.py.
A name that is not a local directory is a Hub repo, downloaded with huggingface_hub.

export: the inverse; a nanoforge-trained model (own tokenizer, tied, no biases) exports as a Llama
model with a chat template equal to tasks.py's own chat format. The files load in
transformers.AutoModelForCausalLM / AutoTokenizer (tests/test_hf.py checks the logits and ids).

Dtypes: `--dtype=auto` keeps the checkpoint's dtype (bf16 stays bf16) when a GPU is there and writes
float32 otherwise (CPU training in bf16 is slow and lossy); float32 / bfloat16 / float16 force one.
transformers is not imported here: only safetensors (and huggingface_hub for a download).
"""
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from common import atomic_write, load_checkpoint, parse_config, save_checkpoint
from model import GPT, ModelConfig
from tokenizer import tokenizer_from_hf, tokenizer_to_hf

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFConfig:
    source: str = ""          # --from: a model directory or a Hub repo (import); a checkpoint (export)
    out_dir: str = ""
    dtype: str = "auto"       # auto | float32 | bfloat16 | float16
    max_shard_size: str = "5GB"  # export: safetensors shards above this size (transformers' default)
    revision: str = "main"    # import from the Hub: branch, tag or commit


def fail(msg):
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def model_config_from_hf(hf, where):
    """ModelConfig of a Llama/Qwen2 config.json dict; refuses what the model does not compute."""
    arch = (hf.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch) or {"llama": "llama", "qwen2": "qwen2"}.get(hf.get("model_type"))
    if family is None:
        fail(f"{where}: architecture {arch or hf.get('model_type')} is not supported "
             f"(LlamaForCausalLM or Qwen2ForCausalLM)")
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "default":
        fail(f"{where}: rope scaling {rope_type!r} (rope_scaling/rope_parameters) is not supported")
    if family == "llama" and hf.get("attention_bias"):
        fail(f"{where}: attention_bias=true (biases on q/k/v and o_proj) is not supported for Llama models")
    if hf.get("mlp_bias"):
        fail(f"{where}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        fail(f"{where}: use_sliding_window=true (sliding-window attention in use) is not supported")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        fail(f"{where}: layer_types other than full_attention ({sorted(set(hf['layer_types']))}) are not supported")
    for key in ("num_experts", "num_local_experts", "moe_intermediate_size"):
        if hf.get(key):
            fail(f"{where}: {key} (mixture of experts) is not supported")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        fail(f"{where}: head_dim={hf.get('head_dim')} differs from hidden_size/num_attention_heads={d / heads:g}; "
             f"not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
                       n_kv_head=hf.get("num_key_value_heads") or heads, d_model=d, d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
                       norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=family == "qwen2",
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def hf_config_from_model(cfg, tok, dtype, base=None):
    """config.json for a ModelConfig: Qwen2 when it has q/k/v biases, else Llama. `base` (the imported
    model's own config.json) keeps its other fields."""
    qwen = cfg.qkv_bias
    hf = dict(base or {})
    for k in ("rope_scaling", "torch_dtype", "transformers_version", "_name_or_path"):
        hf.pop(k, None)
    hf.update({
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.d_model // cfg.n_head, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "dtype": str(dtype).replace("torch.", ""),
        "bos_token_id": tok.bos_id, "eos_token_id": tok.end_id,
    })
    if qwen:
        hf.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
                   "layer_types": ["full_attention"] * cfg.n_layer})
        hf.pop("attention_bias", None)
    else:
        hf["attention_bias"] = False
    return hf


# ----------------------------------------------------------------------------------------------
# tensor names

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IN_LAYER = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
             "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
             "mlp.down_proj": "mlp.down_proj", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "mlp_norm"}
_OUT_LAYER = {v: k for k, v in _IN_LAYER.items()}


def nanoforge_name(hf_name):
    """model.layers.3.self_attn.q_proj.bias -> blocks.3.attn.q_proj.bias; None for tensors to skip."""
    if hf_name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "lm_head.weight"}[hf_name]
    m = _LAYER.fullmatch(hf_name)
    if m:
        if m.group(2).endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; recomputed
            return None
        module, _, param = m.group(2).rpartition(".")
        if module in _IN_LAYER:
            return f"blocks.{m.group(1)}.{_IN_LAYER[module]}.{param}"
    raise KeyError(hf_name)


def hf_name(name):
    if name in ("embed.weight", "norm.weight", "lm_head.weight"):
        return {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}[name]
    _, layer, rest = name.split(".", 2)
    module, _, param = rest.rpartition(".")
    return f"model.layers.{layer}.{_OUT_LAYER[module]}.{param}"


# ----------------------------------------------------------------------------------------------
# import

def resolve_source(source, revision="main"):
    """A local directory, or a Hub repo downloaded (config, tokenizer files, safetensors) to the HF cache."""
    if os.path.isdir(source):
        return source
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        fail(f"--from={source}: no such directory, and not a Hub repo name (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(source, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:
        fail(f"--from={source}: download from the Hugging Face Hub failed ({type(e).__name__}: {str(e)[:160]}). "
             f"Download it elsewhere and pass the directory.")


def safetensors_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in dict.fromkeys(weight_map.values())]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    bins = [n for n in os.listdir(model_dir) if n.endswith(".bin")]
    fail(f"{model_dir} has no model.safetensors or model.safetensors.index.json"
         + (f" (only {bins[0]}...: pickled PyTorch weights are not read; convert them to safetensors)" if bins else ""))


def pick_dtype(name, stored):
    if name == "auto":
        return stored if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        fail(f"--dtype must be auto, {', '.join(DTYPES)}; got '{name}'")
    return DTYPES[name]


def read_hf_weights(model_dir, cfg, dtype_name="auto"):
    """The state dict of GPT(cfg), read tensor by tensor from the safetensors files."""
    from safetensors import safe_open
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    state, dtype = {}, None
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                try:
                    name = nanoforge_name(key)
                except KeyError:
                    fail(f"{path}: tensor {key} has no place in a Llama/Qwen2 model (unsupported architecture?)")
                if name is None or (name == "lm_head.weight" and cfg.tie_embeddings):
                    continue  # a tied checkpoint may store the shared matrix twice
                t = f.get_tensor(key)
                if dtype is None:
                    dtype = pick_dtype(dtype_name, t.dtype)
                if name not in expected or tuple(t.shape) != tuple(expected[name]):
                    fail(f"{path}: tensor {key} has shape {tuple(t.shape)}, config.json implies "
                         f"{tuple(expected[name]) if name in expected else 'none'}")
                state[name] = t.to(dtype) if t.is_floating_point() else t
                del t
    missing = sorted(set(expected) - set(state))
    if missing:
        fail(f"{model_dir}: missing tensors {', '.join(hf_name(k) for k in missing[:4])}"
             f"{' ...' if len(missing) > 4 else ''}")
    return state


def import_hf(cfg):
    model_dir = resolve_source(cfg.source, cfg.revision)
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        fail(f"{model_dir} has no config.json: not a Hugging Face model directory")
    with open(cfg_path) as f:
        hf = json.load(f)
    mcfg = model_config_from_hf(hf, cfg_path)
    tok = tokenizer_from_hf(model_dir)
    if tok.vocab_size > mcfg.vocab_size:
        fail(f"{model_dir}: the tokenizer has ids up to {tok.vocab_size - 1}, the model only {mcfg.vocab_size} rows")
    state = read_hf_weights(model_dir, mcfg, cfg.dtype)
    model = GPT.from_state_dict(mcfg, state)
    fmt = "chat" if tok.chat_template else "plain"
    path = save_checkpoint(cfg.out_dir, stage="import", step=0, model=model, tok=tok, train_cfg=cfg,
                           extra={"fmt": fmt, "hf_source": cfg.source, "hf_config": hf})
    dtype = next(iter(state.values())).dtype
    print(f"imported {hf.get('architectures', ['?'])[0]} from {model_dir}: {model.num_params() / 1e6:.1f}M "
          f"parameters ({str(dtype).replace('torch.', '')}), tokenizer {tok.name} ({tok.vocab_size} ids, "
          f"end-of-turn {tok.roles['end']}), format {fmt} -> {path}")
    return path


# ----------------------------------------------------------------------------------------------
# export

def parse_size(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", s.upper())
    if not m:
        fail(f"--max_shard_size: expected a size like 5GB or 500MB, got '{s}'")
    unit = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def export_hf(cfg):
    from safetensors.torch import save_file
    model, tok, meta, ckpt = load_checkpoint(cfg.source, "cpu")
    dtype = pick_dtype(cfg.dtype, model.embed.weight.dtype) if cfg.dtype != "auto" else model.embed.weight.dtype
    os.makedirs(cfg.out_dir, exist_ok=True)
    tensors = {hf_name(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    # shards in tensor order, each under max_shard_size (a tensor larger than that gets a shard of its own)
    limit, shards, size = parse_size(cfg.max_shard_size), [{}], 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        path = os.path.join(cfg.out_dir, name)
        save_file(shard, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        atomic_write(os.path.join(cfg.out_dir, "model.safetensors.index.json"), index)
    hf = hf_config_from_model(model.cfg, tok, dtype, meta.get("hf_config"))
    atomic_write(os.path.join(cfg.out_dir, "config.json"), hf)
    tokenizer_json, tokenizer_config = tokenizer_to_hf(tok)
    atomic_write(os.path.join(cfg.out_dir, "tokenizer.json"), tokenizer_json)
    atomic_write(os.path.join(cfg.out_dir, "tokenizer_config.json"), tokenizer_config)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids if len(tok.stop_ids) > 1 else tok.end_id,
           "pad_token_id": tok.special.get(tokenizer_config.get("pad_token"))}
    atomic_write(os.path.join(cfg.out_dir, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
    print(f"exported {meta['stage']} checkpoint {ckpt} as {hf['architectures'][0]} ({str(dtype).replace('torch.', '')},"
          f" {len(shards)} shard{'s' if len(shards) > 1 else ''}) -> {cfg.out_dir}")
    return cfg.out_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("import", "export"):
        raise SystemExit("usage: python hf.py import --from=DIR_OR_REPO --out_dir=DIR [--dtype=auto]\n"
                         "       python hf.py export --from=CKPT --out_dir=DIR [--dtype=auto] [--max_shard_size=5GB]")
    # --from is the flag's name (a Python keyword, so the field is `source`)
    args = ["--source=" + a[len("--from="):] if a.startswith("--from=") else a for a in argv[1:]]
    cfg = parse_config(HFConfig(), args)
    if not cfg.source or not cfg.out_dir:
        raise SystemExit(f"error: hf.py {argv[0]} needs --from=... and --out_dir=...")
    return import_hf(cfg) if argv[0] == "import" else export_hf(cfg)


if __name__ == "__main__":
    main()
