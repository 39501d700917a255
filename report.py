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


# (panel title, y label, log scale, [(stage, metric key, label, style, scale)]); a panel with no points is left out
PANELS = [
    ("pretrain loss", "nats/token", True, [("pretrain", "loss", "train", "-", 1), ("pretrain", "val_loss", "val", "o-", 1)]),
    ("SFT loss (assistant tokens)", "nats/token", True, [("sft", "loss", "train", "-", 1)]),
    ("GRPO reward", "fraction", False, [("grpo", "reward", "train reward (group mean)", "-", 1),
                                        ("grpo", "accuracy", "train accuracy (binary correctness)", "--", 1),
                                        ("grpo", "heldout_pass1", "held-out pass@1 (greedy)", "o-", 0.01)]),
    ("GRPO KL to the start policy", "nats/token", False, [("grpo", "kl", "k3 KL", "-", 1)]),
    ("GRPO policy entropy", "nats/token", False, [("grpo", "entropy", "mean token entropy of the samples", "-", 1)]),
    ("GRPO response length", "tokens", False, [("grpo", "response_len", "mean completion length", "-", 1)]),
    ("GRPO groups and cut-offs", "fraction", False, [("grpo", "frac_all_equal", "groups with all-equal rewards", "-", 1),
                                                     ("grpo", "truncated", "completions cut off", "-", 1)]),
    ("gradient norm (before clipping)", "L2 norm", True, [("pretrain", "grad_norm", "pretrain", "-", 1),
                                                          ("sft", "grad_norm", "SFT", "-", 1),
                                                          ("grpo", "grad_norm", "GRPO", "-", 1)]),
]


def plot_curves(m, png):
    """Only the panels (and legend entries) that have points; returns the number of panels drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, ylabel, log_y, lines in PANELS:
        drawn = [(series(m[stage], key), label, style, scale) for stage, key, label, style, scale in lines]
        drawn = [d for d in drawn if d[0][0]]
        if drawn:
            panels.append((title, ylabel, log_y, drawn))
    if not panels:
        return 0
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, ylabel, log_y, drawn) in zip(axes.flat, panels):
        for (x, y), label, style, scale in drawn:
            ax.plot(x, [v * scale for v in y], style, label=label, markersize=3)
        ax.set(title=title, xlabel="step (GRPO: iteration)", ylabel=ylabel)
        if log_y and all(v > 0 for (_, y), *_ in drawn for v in y):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return len(panels)


def main(cfg):
    m = {s: read_metrics(os.path.join(cfg.out_dir, s, "metrics.jsonl")) for s in ("pretrain", "sft", "grpo")}
    png = os.path.join(cfg.out_dir, "report.png")
    n_panels = plot_curves(m, png)
    sections = [f"# nanoforge report: {cfg.out_dir}\n"]
    if n_panels:
        sections.append("![curves](report.png)\n")
    table = ""
    eval_md = os.path.join(cfg.out_dir, "eval.md")
    if os.path.exists(eval_md):
        table = open(eval_md).read().strip()
    if table:
        sections.append(f"## Held-out evaluation\n\n{table}\n")
    bench = ""
    bench_md = os.path.join(cfg.out_dir, "eval_benchmarks.md")
    if os.path.exists(bench_md):
        bench = open(bench_md).read().strip()
    if bench:
        sections.append("## Benchmarks (lm-evaluation-harness formats and metrics; details in eval_benchmarks.json)"
                        f"\n\n{bench}\n")
    sft_ckpt_meta = os.path.join(cfg.out_dir, "sft", "ckpt", "meta.json")
    if os.path.exists(sft_ckpt_meta):
        meta = json.load(open(sft_ckpt_meta))
        lines = "\n".join(f"- alpha = {a}: " + ", ".join(f"{k} {v:.1f}%" for k, v in r.items())
                          for a, r in (meta.get("alpha_report") or {}).items())
        if lines:
            sections.append(f"## SFT weight interpolation (chosen alpha = {meta.get('alpha')})\n\n{lines}\n")
    atomic_write(os.path.join(cfg.out_dir, "report.md"), "\n".join(sections))
    print(f"report: {os.path.join(cfg.out_dir, 'report.md')}" + (f" and {png}" if n_panels else "") + "\n")
    print(table)
    if bench:
        print(bench)


if __name__ == "__main__":
    main(parse_config(ReportConfig()))
