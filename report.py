"""
The end-of-pipeline report: training curves of every stage and the evaluation table.

    python report.py --out_dir=out/demo

Reads <out_dir>/{pretrain,sft,grpo}/metrics.jsonl, <out_dir>/eval.md and, when there is one, the
benchmark table <out_dir>/eval_benchmarks.md (python eval.py --tasks=... --out=<out_dir>/eval); writes
<out_dir>/report.md and <out_dir>/report.png, then prints the table.
"""
import json
import os
from dataclasses import dataclass

from common import atomic_write, parse_config


@dataclass
class ReportConfig:
    out_dir: str = "out/demo"


def read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = {s: read_metrics(os.path.join(cfg.out_dir, s, "metrics.jsonl")) for s in ("pretrain", "sft", "grpo")}
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(*series(m["pretrain"], "loss"), label="train")
    ax[0].plot(*series(m["pretrain"], "val_loss"), "o-", label="val")
    ax[0].set(title="pretrain loss", xlabel="step", ylabel="nats/token")
    ax[1].plot(*series(m["sft"], "loss"), label="train (assistant tokens)")
    ax[1].set(title="SFT loss", xlabel="step")
    ax[2].plot(*series(m["grpo"], "reward"), label="train reward (mean of group samples)")
    x, y = series(m["grpo"], "heldout_pass1")
    ax[2].plot(x, [v / 100 for v in y], "o-", label="held-out pass@1 (greedy)")
    ax[2].set(title="GRPO", xlabel="iteration", ylim=(0, 1))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    png = os.path.join(cfg.out_dir, "report.png")
    fig.savefig(png, dpi=100)

    table = ""
    eval_md = os.path.join(cfg.out_dir, "eval.md")
    if os.path.exists(eval_md):
        table = open(eval_md).read()
    bench = ""
    bench_md = os.path.join(cfg.out_dir, "eval_benchmarks.md")
    if os.path.exists(bench_md):
        bench = ("\n## Benchmarks (lm-evaluation-harness formats and metrics; details in eval_benchmarks.json)\n\n"
                 + open(bench_md).read())
    sft_alpha = ""
    sft_ckpt_meta = os.path.join(cfg.out_dir, "sft", "ckpt", "meta.json")
    if os.path.exists(sft_ckpt_meta):
        meta = json.load(open(sft_ckpt_meta))
        sft_alpha = "\n".join(f"- alpha = {a}: " + ", ".join(f"{k} {v:.1f}%" for k, v in r.items())
                              for a, r in meta.get("alpha_report", {}).items())
        sft_alpha = f"\n## SFT weight interpolation (chosen alpha = {meta.get('alpha')})\n\n{sft_alpha}\n"
    atomic_write(os.path.join(cfg.out_dir, "report.md"),
                 f"# nanoforge report: {cfg.out_dir}\n\n![curves](report.png)\n\n## Held-out evaluation\n\n"
                 f"{table}\n{bench}{sft_alpha}")
    print(f"report: {os.path.join(cfg.out_dir, 'report.md')} and {png}\n")
    print(table)
    if bench:
        print(bench)


if __name__ == "__main__":
    main(parse_config(ReportConfig()))
