"""
Throughput of benchmarks.py's batched multiple-choice scoring against the straightforward computation
of the same scores (one forward per (context, choice) pair, full logits, as the harness does it
without its batching), side by side in one run, on a 135M-shaped model (SmolLM2-135M's shape, random
weights: speed does not depend on the weights).

    python bench/benchmarks.py                                 # 32 items of each multiple-choice task, CPU
    python bench/benchmarks.py --items=200 --device=cuda       # on a GPU: writes bench/results/
    python bench/benchmarks.py --hf_compare=out/smollm2 --hf_gguf=.../SmolLM2-135M-Instruct.Q4_1.gguf --items=5

--hf_compare: an imported checkpoint (hf.py import) against transformers' own forward of the same weights
(transformers is a test-time dependency; only this option imports it): the per-choice log-likelihoods of
the harness's requests, and whether both tokenizers give the same ids.

Items come from ../shared/data when it is there (the harness's formats; MMLU one item per subject in
turn), else synthetic items of similar lengths. Each task is timed on its own, both paths one after the
other, and reported with the total over all tasks. The tokenizer is a small BPE trained here on the items' text; the
model keeps the 135M preset's 49152-row vocabulary, so the output layer costs what it costs in
SmolLM2-135M. Reports items/s of each path, the speed-up, the ratio of the two paths' linear-layer
work (linear_macs: what the speed-up tracks on a compute-bound device), the largest |difference| of the per-choice
log-likelihoods, and the machine's load average (the machine may be shared: compare the two paths of
one run, not runs).
"""
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks as B  # noqa: E402
from common import parse_config, pick_device  # noqa: E402
from model import GPT, model_config  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

from bench.generate import env_info  # noqa: E402  (one machine description for every bench)


@dataclass
class BenchConfig:
    items: int = 32               # per task
    tasks: str = ",".join(B.MC_TASKS)  # the multiple-choice tasks timed (each: both paths, one after the other)
    model: str = "135m"
    max_batch_tokens: int = 8192
    device: str = "cpu"
    threads: int = 0              # torch threads (0 = torch's default)
    data_dir: str = B.DEFAULT_DATA_DIR
    out: str = ""                 # results JSON ('' = out/bench_benchmarks_<device>.json; bench/results/ on a GPU)
    seed: int = 0
    hf_compare: str = ""          # an imported checkpoint to compare with transformers (see above)
    hf_gguf: str = ""             # the GGUF (or HF model directory) transformers loads for --hf_compare


def synthetic_requests(rng, n):
    words = "the a man woman sat on roof he she was better than so got harder cases steam ice rock water".split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    return [B._mc(text(rng.randint(20, 60)), [text(rng.randint(8, 30)) for _ in range(4)], 0) for _ in range(n)]


def load_requests(cfg, rng):
    """{task: requests}: the first --items items of each task (MMLU: across subjects)."""
    out = {}
    for task in [t.strip() for t in cfg.tasks.split(",") if t.strip()]:
        try:
            docs = B.load_docs(task, cfg.data_dir, hub=_Offline(), log=lambda *_: None)
            if task == "mmlu":  # one item from each subject in turn, so a few items span the subjects
                seen = {}
                rank = [seen.setdefault(d["subject"], []).append(None) or len(seen[d["subject"]]) for d in docs]
                docs = [d for _, _, d in sorted(zip(rank, range(len(docs)), docs), key=lambda x: x[:2])]
            out[task] = [B.FORMATS[task](d) for d in docs[:cfg.items]]
        except SystemExit:
            out[task] = synthetic_requests(rng, cfg.items)
    return out


def linear_macs(model, tok, reqs):
    """Multiply-accumulates of the linear layers (the bulk of the work at these lengths) for both paths:
    one forward per choice runs every input token through the trunk and the output layer; batched
    scoring runs each item's packed tree (shared prefix once) through the trunk and only the scored
    positions through the output layer. Where the device is compute-bound (a CPU) the speed-up tracks
    this ratio; it is not a hard ceiling: padding and attention are left out, and one forward per choice
    also pays per-call overhead and a full-vocabulary log-softmax at every position."""
    head = model.lm_head_weight.numel()
    trunk = sum(p.numel() for n, p in model.named_parameters()
                if p.dim() == 2 and p is not model.lm_head_weight and p is not model.embed.weight)
    plain = batched = 0
    for r in reqs:
        seqs = B.item_sequences(tok, r, model.cfg.max_seq_len)
        plain += sum(len(s) - 1 for s, _ in seqs) * (trunk + head)
        tokens, _, _, _, targets = B._pack(seqs)
        batched += len(tokens) * trunk + sum(len(t) for t in targets) * head
    return plain, batched


class _Offline:
    def list_repo_files(self, *a, **k):
        raise ConnectionError("the benchmark never downloads")


@torch.no_grad()
def hf_compare(cfg):
    """Log-likelihoods of nanoforge (batched scoring of an imported checkpoint) vs transformers' forward."""
    import transformers
    from common import load_checkpoint
    model, tok, meta, _ = load_checkpoint(cfg.hf_compare, "cpu")
    model.eval()
    path = cfg.hf_gguf
    kw = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
    src = os.path.dirname(path) if path.endswith(".gguf") else path
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, **kw).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(src, **kw)
    reqs = []
    for task in ("hellaswag", "arc_easy", "winogrande", "mmlu"):
        docs = B.load_docs(task, cfg.data_dir, limit=cfg.items, hub=_Offline(), log=lambda *_: None)
        reqs += [B.FORMATS[task](d) for d in docs[:cfg.items]]  # MMLU's limit is per subject: keep cfg.items
    add_bos = meta.get("stage") != "import"

    class hf_encoder:
        bos_id = None

        @staticmethod
        def encode(text):
            return ref_tok(text, add_special_tokens=False)["input_ids"]

    torch.set_grad_enabled(False)
    ours = B.score_items(model, tok, reqs, add_bos=add_bos, progress=False)
    worst, same_ids, n = 0.0, 0, 0
    for r, o in zip(reqs, ours):
        for (ctx, cont), (ll, _, _) in zip(zip(r["contexts"], r["continuations"]), o):
            c_ids, k_ids = B.encode_pair(tok, ctx, cont, add_bos)
            ref_pair = B.encode_pair(hf_encoder, ctx, cont, add_bos=False)  # the harness's split, HF's tokenizer
            same_ids += ref_pair == (c_ids[1:] if add_bos else c_ids, k_ids)
            x = torch.tensor(c_ids + k_ids)[None]
            logp = ref(x).logits[0, :-1].float().log_softmax(-1)
            want = float(logp[len(c_ids) - 1:].gather(1, torch.tensor(k_ids)[:, None]).double().sum())
            worst = max(worst, abs(want - ll))
            n += 1
    res = {"pairs": n, "max_abs_loglik_diff_vs_transformers": worst, "same_token_ids": f"{same_ids}/{n}",
           "transformers": transformers.__version__, "checkpoint": cfg.hf_compare, "weights": path}
    print(json.dumps(res, indent=1))
    return res


def main(cfg):
    if cfg.hf_compare:
        return hf_compare(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    rng = random.Random(cfg.seed)
    by_task = load_requests(cfg, rng)
    reqs = [r for rs in by_task.values() for r in rs]
    texts = [c + k for r in reqs for c, k in zip(r["contexts"], r["continuations"])]
    tok = train_tokenizer(texts * 4, 1024)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg.model)).to(device).eval()
    n_choices = sum(len(r["continuations"]) for r in reqs)
    load0 = os.getloadavg()
    # warm-up of both paths on two items, so neither pays first-call costs
    B.score_items(model, tok, reqs[:2], progress=False)
    B.score_unbatched(model, tok, reqs[:2])
    per_task, t_batched, t_plain, diff, same_pick = {}, 0.0, 0.0, 0.0, 0
    macs_plain = macs_batched = 0
    for task, rs in by_task.items():  # the two paths task by task, one after the other
        t0 = time.time()
        batched = B.score_items(model, tok, rs, max_batch_tokens=cfg.max_batch_tokens, progress=False)
        tb = time.time() - t0
        t0 = time.time()
        plain = B.score_unbatched(model, tok, rs)
        tp = time.time() - t0
        t_batched, t_plain = t_batched + tb, t_plain + tp
        diff = max([diff] + [abs(a[0] - b[0]) for x, y in zip(batched, plain) for a, b in zip(x, y)])
        same_pick += sum(B.mc_metrics(r, x)["pred"] == B.mc_metrics(r, y)["pred"] for r, x, y in zip(rs, batched, plain))
        m_plain, m_batched = linear_macs(model, tok, rs)
        macs_plain, macs_batched = macs_plain + m_plain, macs_batched + m_batched
        per_task[task] = {"items": len(rs), "batched_items_per_s": round(len(rs) / tb, 3),
                          "unbatched_items_per_s": round(len(rs) / tp, 3), "speedup": round(tp / tb, 2),
                          "linear_macs_ratio": round(m_plain / m_batched, 2)}
        print(f"{task:15s} {len(rs):4d} items  batched {len(rs) / tb:7.2f} items/s  one forward per choice "
              f"{len(rs) / tp:7.2f} items/s  speed-up {tp / tb:5.1f}x  "
              f"(linear-layer work {m_plain / m_batched:4.1f}x less)", flush=True)
    load1 = os.getloadavg()
    res = {"items": len(reqs), "choices": n_choices,  # device and threads: env_info's
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "batched_items_per_s": len(reqs) / t_batched, "unbatched_items_per_s": len(reqs) / t_plain,
           "speedup": t_plain / t_batched, "linear_macs_ratio": macs_plain / macs_batched,
           "per_task": per_task, "max_abs_loglik_diff": diff,
           "same_prediction": f"{same_pick}/{len(reqs)}",
           "loadavg_1min_before_after": [round(load0[0], 2), round(load1[0], 2)], "config": asdict(cfg),
           **env_info(torch.device(device))}  # date, commit, versions, GPU and driver
    print(f"{len(reqs)} items ({n_choices} choices), {cfg.model} model on {device} ({res['threads']} threads, "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f} on {res['cores']} cores)")
    print(f"all tasks: batched (packed, length-sorted): {res['batched_items_per_s']:.2f} items/s   "
          f"one forward per choice: {res['unbatched_items_per_s']:.2f} items/s   speed-up {res['speedup']:.1f}x")
    print(f"linear-layer work of one forward per choice / batched: {res['linear_macs_ratio']:.2f}x "
          f"(what the speed-up tracks where the device is compute-bound)")
    print(f"largest |log-likelihood difference| {diff:.2e}; same prediction on {same_pick}/{len(reqs)} items")
    out = cfg.out or (f"bench/results/benchmarks_{device}.json" if device.startswith("cuda")
                      else f"out/bench_benchmarks_{device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main(parse_config(BenchConfig()))
