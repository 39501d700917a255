"""
The RL-recipe ablation: every `grpo.py --recipe` on the embedded task from ONE shared SFT checkpoint, a fixed
budget, two seeds each, plus the hard split (the L20-Edu failure mode: the starting policy's pass rate is near
zero) with and without dynamic sampling and the difficulty pre-filter. Evidence, not a test.

    make ablation                     # = python bench/ablation.py
    python bench/ablation.py --presets=grpo,dapo --seeds=1 --iterations=6   # smaller
    # GPU, GSM8K, a real model (needs the HF import of the "Real models in and out" issue):
    python bench/ablation.py --init_from=out/smollm2 --data=../shared/data/gsm8k/train.jsonl \
        --heldout=../shared/data/gsm8k/test.jsonl --presets=grpo,dapo,prorl --hard=false --parallel=1 \
        --iterations=200 --prompts_per_iter=32 --group_size=16 --max_new_tokens=256 --n_eval=1319 \
        --lr=1e-6 --out_dir=bench/results/ablation_gsm8k

Steps: (1) the shared start, built once and reused: tasks.py with a 5% share of hard problems in the pretraining
and SFT data, pretrain.py and sft.py as `make demo` runs them but shorter (200 pretraining steps, half an SFT epoch); (2) every run is `grpo.main` in a worker process
(one thread each, `parallel` at a time), then held-out pass@1 (greedy) and pass@k (k samples at T = 1) of its
final checkpoint; (3) <out_dir>/ablation.json and ablation.md. Finished runs are kept in <out_dir>/runs/*.json
and skipped on a rerun, so an interrupted ablation continues where it stopped.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import atomic_write, parse_config  # noqa: E402


@dataclass
class AblationConfig:
    out_dir: str = "out/ablation"
    init_from: str = ""            # a start checkpoint; "" = build the embedded task's shared SFT checkpoint once
    data: str = ""                 # RL prompts ("" = the built data's rl.jsonl)
    heldout: str = ""              # evaluation problems ("" = the built data's heldout.jsonl)
    presets: str = "grpo,dapo,dr_grpo,prorl,openrs,mgpo"
    seeds: str = "1,2"
    hard: bool = True              # also the hard-split runs (embedded task only)
    hard_share: float = 0.05       # share of hard problems in the built pretraining/SFT data
    pretrain_steps: int = 200      # the built start's pretraining (make demo: 600; cut for a shared 2-core box)
    sft_epochs: float = 0.5        # the built start's SFT (make demo: 1)
    iterations: int = 8            # the fixed budget of every run
    prompts_per_iter: int = 8
    group_size: int = 8            # presets that set their own (openrs: 6) keep it
    max_new_tokens: int = 64
    max_sampling_rounds: int = 4   # dynamic sampling's cap in this budget
    prefilter_samples: int = 8
    prefilter_pool: int = 128
    lr: float = 1e-4
    n_eval: int = 200
    k: int = 8
    parallel: int = 2              # worker processes (one thread each)
    device: str = "auto"


def build_start(cfg):
    """The shared start: data (with hard problems), pretraining, SFT; each step skipped when its output exists."""
    base = os.path.join(cfg.out_dir, "base")
    py = [sys.executable]
    steps = [(os.path.join(base, "data", "heldout_hard.jsonl"),
              py + ["tasks.py", f"--out_dir={base}/data", f"--hard_share={cfg.hard_share}"]),
             (os.path.join(base, "pretrain", "ckpt", "meta.json"),
              py + ["pretrain.py", f"--data_dir={base}/data", f"--out_dir={base}/pretrain", f"--device={cfg.device}",
                    f"--max_steps={cfg.pretrain_steps}", "--ckpt_interval=100", "--eval_interval=100"]),
             (os.path.join(base, "sft", "ckpt", "meta.json"),
              py + ["sft.py", f"--init_from={base}/pretrain", f"--data={base}/data/sft.jsonl",
                    f"--heldout={base}/data/heldout.jsonl", f"--out_dir={base}/sft", f"--device={cfg.device}",
                    f"--epochs={cfg.sft_epochs}", "--n_eval=0"])]  # the start is evaluated below, with the runs' settings
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for done, cmd in steps:
        if not os.path.exists(done):
            print("ablation: " + " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return os.path.join(base, "sft"), os.path.join(base, "data")


def run_specs(cfg, start, data_dir):
    """(name, group, seed, grpo overrides, eval sets) for every run."""
    data = cfg.data or os.path.join(data_dir, "rl.jsonl")
    heldout = cfg.heldout or os.path.join(data_dir, "heldout.jsonl")
    evals = {"heldout": heldout}  # the presets are judged on the held-out set, the hard-split runs on the hard one
    hard_evals = {"hard": os.path.join(data_dir, "heldout_hard.jsonl")}
    common = dict(init_from=start, iterations=cfg.iterations, prompts_per_iter=cfg.prompts_per_iter,
                  max_new_tokens=cfg.max_new_tokens, max_sampling_rounds=cfg.max_sampling_rounds, lr=cfg.lr,
                  eval_interval=cfg.iterations, n_eval=0, device=cfg.device, kernels="auto")
    specs = []
    for seed in [int(s) for s in cfg.seeds.split(",")]:
        for preset in cfg.presets.split(","):
            specs.append((f"{preset}_s{seed}", preset, seed, dict(common, recipe=preset, data=data, seed=seed), evals))
        if cfg.hard:
            hard = dict(common, recipe="grpo", data=os.path.join(data_dir, "rl_hard.jsonl"), seed=seed)
            specs.append((f"hard_grpo_s{seed}", "hard: grpo", seed, hard, hard_evals))
            specs.append((f"hard_dynamic_s{seed}", "hard: grpo + dynamic sampling", seed,
                          dict(hard, dynamic_sampling=True), hard_evals))
            specs.append((f"hard_prefilter_s{seed}", "hard: grpo + pre-filter", seed,
                          dict(hard, prefilter_samples=cfg.prefilter_samples, prefilter_pool=cfg.prefilter_pool),
                          hard_evals))
    return specs


def eval_rows(path, n):
    """The first n problems of a JSONL file, each with a `target` (GSM8K rows carry it after '#### '):
    tasks.load_examples, the loader GRPO and eval read held-out rows with."""
    from tasks import load_examples
    return load_examples(path, "target", "ablation held-out", limit=n)


def run_one(args):
    """One GRPO run in a worker: train, then evaluate its checkpoint. -> result dict (also written to runs/)."""
    name, group, seed, overrides, evals, out_dir, group_size, k, n_eval = args
    import torch
    torch.set_num_threads(1)
    import grpo
    from common import load_checkpoint, pick_device
    from eval import heldout_accuracy
    cfg = grpo.apply_recipe(grpo.GRPOConfig(), overrides["recipe"])
    if "group_size" not in grpo.RECIPES[overrides["recipe"]]:
        cfg.group_size = group_size
    for key, v in overrides.items():
        setattr(cfg, key, v)
    cfg.out_dir = os.path.join(out_dir, "runs", name)
    t0 = time.time()
    log_path = cfg.out_dir + ".log"
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(log_path, "w") as f:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = f
        try:
            grpo.main(cfg)
        except SystemExit as e:  # a run that refuses (e.g. the pre-filter kept too few prompts) is a result too
            print(f"ablation: {name} stopped: {e}", file=old_out, flush=True)
            return {"name": name, "group": group, "seed": seed, "failed": str(e),
                    "wall_seconds": round(time.time() - t0, 1)}
        finally:
            sys.stdout, sys.stderr = old_out, old_err
    train_s = time.time() - t0
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    its = [r for r in rows if "frac_all_equal" in r]
    pre = next((r for r in rows if "prefilter_kept" in r), None)
    model, tok, _, _ = load_checkpoint(cfg.out_dir, pick_device(cfg.device))
    res = {"name": name, "group": group, "seed": seed, "config": grpo.asdict(cfg), "train_seconds": round(train_s, 1),
           "frac_all_equal": sum(r["frac_all_equal"] for r in its) / max(1, len(its)),
           "response_len": sum(r["sampled_len"] for r in its) / max(1, len(its)),  # all sampled completions
           "accuracy_train": sum(r.get("accuracy", r.get("reward", 0)) for r in its) / max(1, len(its)),
           "updates": sum("skipped" not in r for r in its), "iterations": len(its),
           "groups_sampled": sum(r["groups_sampled"] for r in its)}
    if cfg.dynamic_sampling:
        res["ds_rounds"] = sum(r.get("ds_rounds", 0) for r in its) / max(1, len(its))
        res["ds_groups"] = sum(r.get("ds_groups", 0) for r in its) / max(1, len(its))
    if pre:
        res["prefilter"] = {k2: pre[k2] for k2 in ("prefilter_measured", "prefilter_zero", "prefilter_one",
                                                   "prefilter_kept")}
    for split, path in evals.items():
        acc = heldout_accuracy(model, tok, eval_rows(path, n_eval), "chat", k=k, max_new_tokens=cfg.max_new_tokens,
                               seed=0)
        res[split] = acc
    res["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write(cfg.out_dir + ".json", res)
    print(f"ablation: {name} done in {res['wall_seconds']:.0f} s: " +
          ", ".join(f"{s} pass@1 {res[s]['pass@1']:.1f}% pass@{k} {res[s][f'pass@{k}']:.1f}%" for s in evals),
          flush=True)
    return res


def eval_start(start, evals, out_dir, k, n_eval, max_new_tokens):
    path = os.path.join(out_dir, "runs", "start.json")
    if os.path.exists(path):
        return json.load(open(path))
    import torch
    torch.set_num_threads(1)
    from common import load_checkpoint
    from eval import heldout_accuracy
    model, tok, _, _ = load_checkpoint(start)
    res = {"name": "start", "group": "start (SFT, no RL)", "seed": 0}
    for split, p in evals.items():
        res[split] = heldout_accuracy(model, tok, eval_rows(p, n_eval), "chat", k=k, max_new_tokens=max_new_tokens,
                                      seed=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, res)
    return res


def table(results, k, splits):
    """One row per group (preset or hard-split variant): the mean over seeds, each seed in brackets."""
    groups = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)

    def cell(rs, get, fmt="{:.1f}"):
        vals = [get(r) for r in rs]
        if any(v is None for v in vals):
            return "-"
        mean = fmt.format(sum(vals) / len(vals))
        return mean if len(vals) == 1 else f"{mean} ({', '.join(fmt.format(v) for v in vals)})"

    head = ["run"] + [f"{s} pass@1 (%)" for s in splits] + [f"{s} pass@{k} (%)" for s in splits] + \
           ["all-equal groups", "response len (tok)", "wall (s)", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        notes = []
        if "ds_rounds" in rs[0]:
            notes.append("sampling rounds " + cell(rs, lambda r: r["ds_rounds"]) + ", informative groups/iter " +
                         cell(rs, lambda r: r["ds_groups"]))
        if "prefilter" in rs[0]:
            notes.append("pre-filter kept " + cell(rs, lambda r: r["prefilter"]["prefilter_kept"], "{:.0f}") + " of " +
                         str(rs[0]["prefilter"]["prefilter_measured"]) + " (p=0: " +
                         cell(rs, lambda r: r["prefilter"]["prefilter_zero"], "{:.0f}") + ")")
        if any("failed" in r for r in rs):
            notes.append("stopped: " + "; ".join(r["failed"][:90] for r in rs if "failed" in r))
            rs = [r for r in rs if "failed" not in r] or rs
        row = [g] + [cell(rs, lambda r, s=s: r[s]["pass@1"] if s in r else None) for s in splits] + \
              [cell(rs, lambda r, s=s: r[s][f"pass@{k}"] if s in r else None) for s in splits] + \
              [cell(rs, lambda r: r.get("frac_all_equal"), "{:.2f}"), cell(rs, lambda r: r.get("response_len")),
               cell(rs, lambda r: r.get("wall_seconds"), "{:.0f}"), "; ".join(notes)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(cfg):
    import multiprocessing as mp
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.init_from:
        start, data_dir = cfg.init_from, os.path.dirname(cfg.data or ".")
        cfg.hard = cfg.hard and os.path.exists(os.path.join(data_dir, "rl_hard.jsonl"))
    else:
        start, data_dir = build_start(cfg)
    specs = run_specs(cfg, start, data_dir)
    evals = {}
    for spec in specs:
        evals.update(spec[4])
    start_res = eval_start(start, evals, cfg.out_dir, cfg.k, cfg.n_eval, cfg.max_new_tokens)
    todo, results = [], []
    for spec in specs:
        path = os.path.join(cfg.out_dir, "runs", spec[0] + ".json")
        if os.path.exists(path):
            results.append(json.load(open(path)))
        else:
            todo.append(spec + (cfg.out_dir, cfg.group_size, cfg.k, cfg.n_eval))
    print(f"ablation: {len(specs)} runs ({len(results)} already done), {cfg.parallel} at a time", flush=True)
    if todo:
        with mp.get_context("spawn").Pool(cfg.parallel, maxtasksperchild=1) as pool:
            results += pool.map(run_one, todo, chunksize=1)
    first = {}
    for i, s in enumerate(specs):
        first.setdefault(s[1], i)
    results.sort(key=lambda r: (r["group"].startswith("hard"), first[r["group"]], r["seed"]))
    md = table([start_res] + results, cfg.k, list(evals))
    atomic_write(os.path.join(cfg.out_dir, "ablation.json"),
                 {"config": asdict(cfg), "start": start_res, "runs": results, "seconds": round(time.time() - t0, 1)})
    atomic_write(os.path.join(cfg.out_dir, "ablation.md"), md + "\n")
    print("\n" + md + f"\n\nablation: {time.time() - t0:.0f} s; {cfg.out_dir}/ablation.json and ablation.md", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: the cores are shared
    main(parse_config(AblationConfig()))
