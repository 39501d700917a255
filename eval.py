"""
Evaluate checkpoints and print one table across stages.

    python eval.py --ckpts=out/pretrain,out/sft,out/grpo --data_dir=out/data

For each checkpoint: held-out accuracy on the embedded task (pass@1 greedy, exact match on the
number after '####'), pass@k from k samples at `temperature`, and validation loss (nats/token) and
bits per byte on held-out documents. A pretrained checkpoint is prompted in the plain text format
it was trained on, SFT/GRPO checkpoints in the chat format. Writes <out>.json and <out>.md.

With --tasks, the public benchmarks instead (benchmarks.py: lm-evaluation-harness's formats and metrics):

    python eval.py --ckpts=a,b,c --tasks=l20,gsm8k --limit=500

prints one Markdown table (rows: checkpoints; columns: each task's headline metric, the l20 mean, the
mean) and writes <out>_benchmarks.json (every item's prediction and per-choice log-likelihoods) and
<out>_benchmarks.md. Task names as the harness spells them: hellaswag arc_easy arc_challenge piqa
winogrande openbookqa lambada_openai mmlu gsm8k; `l20` = the first six.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from benchmarks import DEFAULT_DATA_DIR
from common import atomic_write, autocast, load_checkpoint, log, parse_config, pick_device, pick_kernels
from engine import Engine, stop_tokens_for
from tasks import prompt_ids, read_jsonl, stop_at_end
from verifiers import CORRECT, kind_of, prompt_text, score_batch


@dataclass
class EvalConfig:
    ckpts: str = "out/pretrain,out/sft,out/grpo"  # comma-separated checkpoint (or stage) directories
    data_dir: str = "out/data"
    n_heldout: int = 400
    k: int = 8                  # pass@k samples per problem
    temperature: float = 1.0    # for the pass@k samples
    max_new_tokens: int = 64
    batch_size: int = 256       # sequences generated at once
    out: str = "out/eval"       # writes out/eval.json and out/eval.md
    seed: int = 0
    device: str = "auto"
    kernels: str = "auto"
    # public benchmarks (benchmarks.py); empty = the embedded task above
    tasks: str = ""             # e.g. l20,mmlu,gsm8k
    limit: int = 0              # first N items of each task (0 = all), as the harness's --limit
    benchmark_dir: str = DEFAULT_DATA_DIR  # local eval sets (../shared/data layout); else the Hub
    hf_cache: str = "out/hf_datasets"      # where Hub downloads are cached
    add_bos: str = "auto"       # BOS before each context: auto = yes for nanoforge-trained models (trained with
                                # <|bos|> first), no for imported ones (the harness's default for HF causal LMs)
    max_batch_tokens: int = 8192  # packed tokens per scoring forward
    gsm8k_format: str = "auto"  # auto (the checkpoint's: plain -> 5-shot base, chat -> 0-shot chat), base, chat
    gsm8k_max_new_tokens: int = 256  # the harness's max_gen_toks
    gsm8k_batch_size: int = 32  # problems generated at once
    gsm8k_samples: int = 0      # n samples per problem for mean@n and pass@k (0 = greedy only)
    gsm8k_k: str = "1,8"        # pass@k for these k (<= gsm8k_samples)
    sandbox: str = "auto"       # code isolation for code/code_output rows: auto, bwrap, unshare, none (= accept weaker)


def completions(model, tok, questions, fmt, n_samples, temperature, max_new_tokens, batch_size, seed,
                desc=None):
    """n_samples completions (text) for each question, grouped: out[i] is the list for questions[i]."""
    engine = Engine(model, max_batch=batch_size)
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    per_chunk = max(1, batch_size // n_samples)  # questions per engine call, for the progress bar
    texts = []
    for i in tqdm(range(0, len(questions), per_chunk), desc=desc, leave=False, disable=desc is None):
        prompts = [prompt_ids(tok, q, fmt) for q in questions[i:i + per_chunk]]
        out = engine.generate(prompts, n=n_samples, max_new_tokens=max_new_tokens,
                              stop_tokens=stop_tokens_for(tok, fmt), temperature=temperature, generator=gen)
        texts += [[stop_at_end(tok.decode(s.tokens), fmt) for s in group] for group in out]
    return texts


@torch.no_grad()
def heldout_accuracy(model, tok, problems, fmt, k=8, temperature=1.0, max_new_tokens=64, batch_size=256,
                     seed=0, desc=None, sandbox="auto"):
    """-> {"pass@1": %, "pass@k": %} on problems (RL rows of any kind, verifiers.py; the embedded task's
    rows are {question, target}), plus "pass@1/<kind>" for each task kind when there are several. pass@1 is
    greedy; a completion is correct when its kind's verifier gives it >= 0.99."""
    was_training = model.training
    model.eval()
    qs = [prompt_text(p) for p in problems]
    greedy = completions(model, tok, qs, fmt, 1, 0.0, max_new_tokens, batch_size, seed, desc)
    ok = [r is not None and r >= CORRECT
          for r in score_batch(problems, [g[0] for g in greedy], isolation_mode=sandbox)]
    res = {"pass@1": 100 * sum(ok) / len(problems)}
    kinds = sorted({kind_of(p) for p in problems})
    if len(kinds) > 1:
        for kind in kinds:
            idx = [i for i, p in enumerate(problems) if kind_of(p) == kind]
            res[f"pass@1/{kind}"] = 100 * sum(ok[i] for i in idx) / len(idx)
    if k > 0:
        samples = completions(model, tok, qs, fmt, k, temperature, max_new_tokens, batch_size, seed + 1, desc)
        flat = score_batch([p for p in problems for _ in range(k)], [s for ss in samples for s in ss],
                           isolation_mode=sandbox)
        pk = sum(any(r is not None and r >= CORRECT for r in flat[i * k:(i + 1) * k]) for i in range(len(problems)))
        res[f"pass@{k}"] = 100 * pk / len(problems)
    model.train(was_training)
    return res


@torch.no_grad()
def text_loss(model, tok, texts, device, batch_size=32):
    """Mean NLL per token (nats) and bits per byte over documents, each starting with <|bos|>."""
    model.eval()
    nll, n_tok, n_bytes = 0.0, 0, 0
    max_len = model.cfg.max_seq_len
    for i in range(0, len(texts), batch_size):
        rows = [[tok.bos_id] + tok.encode(t)[:max_len] for t in texts[i:i + batch_size]]
        L = max(len(r) for r in rows)
        x = torch.zeros(len(rows), L - 1, dtype=torch.long)
        y = torch.full((len(rows), L - 1), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :len(r) - 1] = torch.tensor(r[:-1])
            y[b, :len(r) - 1] = torch.tensor(r[1:])
        x, y = x.to(device), y.to(device)
        with autocast(device):
            lp = model.token_logprobs(x, y.clamp(min=0))
        m = (y != -100)
        nll -= lp[m].double().sum().item()
        n_tok += int(m.sum())
        n_bytes += sum(len(tok.decode(r[1:]).encode()) for r in rows)
    return nll / n_tok, nll / (math.log(2) * n_bytes)


def format_table(rows, k):
    per_kind = sorted({key for r in rows for key in r if key.startswith("pass@1/")})
    cols = ["pass@1"] + ([f"pass@{k}"] if k > 0 else []) + per_kind
    head = "| stage | " + "".join(f"{c} (%) | " for c in cols) + "val loss | bits/byte |"
    lines = [head, "|---|" + "---:|" * len(cols) + "---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | " + "".join(f"{r.get(c, float('nan')):.1f} | " for c in cols)
                     + f"{r['val_loss']:.4f} | {r['bpb']:.4f} |")
    return "\n".join(lines)


def benchmark_main(cfg, device, kernels):
    import benchmarks
    names, sets = benchmarks.parse_tasks(cfg.tasks)
    if cfg.gsm8k_format not in ("auto", "base", "chat"):
        raise SystemExit(f"error: --gsm8k_format must be auto, base or chat, got '{cfg.gsm8k_format}'")
    if cfg.add_bos not in ("auto", "true", "false"):
        raise SystemExit(f"error: --add_bos must be auto, true or false, got '{cfg.add_bos}'")
    log(f"eval: benchmarks {' '.join(names)}" + (f", first {cfg.limit} items each" if cfg.limit else "")
        + f", device {device}, kernels {kernels}")
    gsm8k_opts = dict(max_new_tokens=cfg.gsm8k_max_new_tokens, batch_size=cfg.gsm8k_batch_size,
                      n_samples=cfg.gsm8k_samples, temperature=cfg.temperature, seed=cfg.seed,
                      k_list=[int(k) for k in cfg.gsm8k_k.split(",") if k])
    rows, items = [], {}
    for path in [p for p in cfg.ckpts.split(",") if p]:
        model, tok, meta, ckpt = load_checkpoint(path, device, kernels=kernels)
        fmt = {"auto": meta.get("fmt", "chat"), "base": "plain", "chat": "chat"}[cfg.gsm8k_format]
        add_bos = meta.get("stage") != "import" if cfg.add_bos == "auto" else cfg.add_bos == "true"
        t0 = time.time()
        metrics, its = benchmarks.run_tasks(model, tok, names, fmt=fmt, data_dir=cfg.benchmark_dir,
                                            cache_dir=cfg.hf_cache, limit=cfg.limit, add_bos=add_bos,
                                            max_batch_tokens=cfg.max_batch_tokens, gsm8k_opts=gsm8k_opts, log=log)
        rows.append({"name": path, "ckpt": ckpt, "stage": meta.get("stage"), "step": meta.get("step"),
                     "gsm8k_format": fmt, "add_bos": add_bos,
                     "metrics": metrics, "seconds": round(time.time() - t0, 1)})
        items[path] = its
    table = benchmarks.format_table(rows, names, sets)
    print("\n" + table + "\n")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    atomic_write(cfg.out + "_benchmarks.json", json.dumps({"config": cfg.__dict__, "tasks": names, "sets": sets,
                                                            "rows": rows, "items": items}))
    atomic_write(cfg.out + "_benchmarks.md", table + "\n")
    log(f"wrote {cfg.out}_benchmarks.json (per-item predictions and scores) and {cfg.out}_benchmarks.md")
    return rows


def main(cfg):
    device = pick_device(cfg.device)
    kernels = pick_kernels(cfg.kernels, device)
    if cfg.tasks:
        return benchmark_main(cfg, device, kernels)
    problems = read_jsonl(os.path.join(cfg.data_dir, "heldout.jsonl"))[:cfg.n_heldout]
    val_texts = [r["text"] for r in read_jsonl(os.path.join(cfg.data_dir, "val_text.jsonl"))]
    log(f"eval: {len(problems)} held-out problems, pass@{cfg.k}, device {device}, kernels {kernels}")
    rows = []
    for path in [p for p in cfg.ckpts.split(",") if p]:
        t0 = time.time()
        model, tok, meta, ckpt = load_checkpoint(path, device, kernels=kernels)
        fmt = meta.get("fmt", "chat")
        acc = heldout_accuracy(model, tok, problems, fmt, cfg.k, cfg.temperature, cfg.max_new_tokens,
                               cfg.batch_size, cfg.seed, desc=f"eval {meta['stage']}", sandbox=cfg.sandbox)
        vloss, bpb = text_loss(model, tok, val_texts, device)
        row = {"stage": meta["stage"], "ckpt": ckpt, "step": meta["step"], "format": fmt, **acc,
               "val_loss": vloss, "bpb": bpb, "n_heldout": len(problems), "seconds": round(time.time() - t0, 1)}
        log(json.dumps(row))
        rows.append(row)
    table = format_table(rows, cfg.k)
    print("\n" + table + "\n")
    atomic_write(cfg.out + ".json", {"config": dataclasses.asdict(cfg), "rows": rows})
    atomic_write(cfg.out + ".md", table + "\n")
    return rows


if __name__ == "__main__":
    main(parse_config(EvalConfig()))
