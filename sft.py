"""
Supervised fine-tuning on chat data, loss on the assistant's tokens only, then weight
interpolation with the base: theta = (1 - alpha) * theta_base + alpha * theta_sft.

    python sft.py --init_from=out/pretrain --data=out/data/sft.jsonl --out_dir=out/sft --alpha=0.9

Data (training and held-out alike, read by tasks.load_examples and validated before training):
JSONL rows {"question", "answer"} (GSM8K style), {"question", "target"} (held-out only), or
{"messages": [{"role", "content"}, ...]} with any number of turns (loss on every assistant turn).
Examples longer than the model's context are dropped, and counted. The checkpoint (the chosen
alpha's weights) is saved as soon as training ends; held-out accuracy at alpha = 0, 1 and the
chosen alpha is computed afterwards and added to it.

    python sft.py --init_from=out/pretrain --data=../shared/data/gsm8k/train.jsonl \
        --heldout=../shared/data/gsm8k/test.jsonl --max_new_tokens=256 --out_dir=out/sft

Spectrum SFT (VibeThinker's diversity-exploring distillation, arXiv 2511.06221 §3.3), with `--probe_every=N`:
  1. domain-aware diversity probing: a snapshot every N steps (and the last one) is scored on a probe set per
     sub-domain (rows tagged `subdomain`; the embedded task's add / sub / two_step / compare: tasks.py writes
     probe.jsonl) by pass@k (`probe_k` samples at T = 1; greedy pass@1 beside it);       probe_snapshot
  2. the specialist of each sub-domain is its best snapshot by pass@k (ties: the higher pass@1, then the later);
  3. expert fusion: the specialists' weights averaged uniformly, one weight per sub-domain (w_i = 1/N, as the
     paper does; a snapshot that wins two sub-domains counts twice);                       fuse
  4. report pass@1 and pass@k on the held-out set of each specialist, of the fused model and of the last
     snapshot; `--save_fused` makes the fused model the SFT result (then interpolated with the base by alpha).
Deviations: the paper builds its probe sets with an LLM and does not give k or N; here they are flags.
"""
import math
import os
import random
from dataclasses import dataclass

import torch
from common import (Metrics, autocast, check_finite, grad_sync, init_distributed, load_checkpoint, load_training_state,
                    log, parse_config, pick_kernels, progress, ranks_reduce, save_checkpoint, seed_everything,
                    set_threads, start_run, update_checkpoint_meta)
from eval import check_budget, fit_prompts, heldout_accuracy
from pretrain import lr_at, make_optimizer
from tasks import chat_messages_ids, load_examples


@dataclass
class SFTConfig:
    init_from: str = "out/pretrain"
    data: str = "out/data/sft.jsonl"
    heldout: str = "out/data/heldout.jsonl"
    out_dir: str = "out/sft"
    resume: bool = False           # continue this run from <out_dir>/ckpt, optimizer, data order and settings included
    overwrite: bool = False        # replace a previous run's checkpoints and metrics in out_dir
    allow_config_change: bool = False  # on resume, apply flags that differ from the saved run's settings
    ckpt_interval: int = 200       # steps between checkpoints (of the fine-tuned weights, alpha 1) for --resume
    keep_last: int = 2             # checkpoints kept: ckpt/ plus the previous ones as ckpt-<step>/
    epochs: float = 1.0
    batch_size: int = 32           # examples per micro-batch (per rank)
    grad_accum: int = 1            # micro-batches per optimizer step; global batch = batch_size x grad_accum x ranks
    gradient_checkpointing: bool = False
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta2: float = 0.95
    grad_clip: float = 1.0
    alpha: float = 0.9             # weight of the fine-tuned model in the interpolation with the base
    n_eval: int = 200              # held-out problems for the alpha report (0 = no report)
    k: int = 8                     # pass@k in that report
    max_new_tokens: int = 64       # completion budget of that report; GSM8K solutions need ~256
    log_interval: int = 20
    probe: str = "out/data/probe.jsonl"  # spectrum SFT's probe set: rows {question, target, subdomain}
    probe_every: int = 0           # spectrum SFT: probe a snapshot every N steps (0 = off)
    probe_n: int = 32              # probe problems per sub-domain
    probe_k: int = 8               # pass@k of the probe
    save_fused: bool = False       # save the fused specialists instead of the last snapshot
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"


def tokenize_examples(tok, rows, max_seq_len, path):
    """(ids, loss_mask) per example; examples longer than the context are dropped, and the count,
    the longest length and the remedy are printed (never silently)."""
    examples, too_long = [], []
    for ex in rows:
        ids, mask = chat_messages_ids(tok, ex["messages"])
        if len(ids) > max_seq_len:
            too_long.append(len(ids))
        else:
            examples.append((ids, mask))
    if too_long:
        log(f"note: dropped {len(too_long)} of {len(rows)} examples of {path} as too long: longer than the model's "
            f"context of {max_seq_len} tokens (the longest has {max(too_long)}). A model preset with a longer "
            f"max_seq_len keeps them.")
    if not examples:
        raise SystemExit(f"error: no example of {path} fits the model's context of {max_seq_len} tokens")
    return examples


def collate(examples, device):
    """Right-pad to the longest; targets are the next token where the mask is on, else -100."""
    L = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), L, dtype=torch.long)
    y = torch.full((len(examples), L), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        y[b, :n] = torch.where(torch.tensor(mask[1:]) == 1, tgt, torch.full_like(tgt, -100))
    return x.to(device), y.to(device)


def interpolate(base_state, sft_state, alpha):
    return {k: ((1 - alpha) * base_state[k].float() + alpha * sft_state[k].float()).to(sft_state[k].dtype)
            for k in sft_state}


def probe_snapshot(model, tok, probe_sets, k, seed):
    """{sub-domain: {"pass@1", "pass@k"}} of the model on each probe set."""
    return {kind: heldout_accuracy(model, tok, rows, "chat", k=k, seed=seed) for kind, rows in probe_sets.items()}


def pick_specialists(scores, k):
    """scores {step: {kind: acc}} -> {kind: step}: the best snapshot per sub-domain by pass@k, then pass@1,
    then the later step."""
    kinds = next(iter(scores.values())).keys()
    return {kind: max(scores, key=lambda st: (scores[st][kind][f"pass@{k}"], scores[st][kind]["pass@1"], st))
            for kind in kinds}


def fuse(states):
    """Uniform weight average of state dicts (VibeThinker's expert fusion with w_i = 1/N)."""
    return {name: (sum(s[name].float() for s in states) / len(states)).to(states[0][name].dtype)
            for name in states[0]}


def spectrum_report(model, tok, snapshots, scores, problems, cfg, metrics, step):
    """Steps 2-4: specialists, fused model, last snapshot on the held-out set. -> (fused state, report)."""
    chosen = pick_specialists(scores, cfg.probe_k)
    fused = fuse([snapshots[chosen[kind]] for kind in sorted(chosen)])
    last = max(snapshots)
    models = {f"specialist step {st} ({', '.join(k for k in sorted(chosen) if chosen[k] == st)})": snapshots[st]
              for st in sorted(set(chosen.values()))}
    models.update({"fused": fused, f"last snapshot (step {last})": snapshots[last]})
    report = {"specialists": chosen, "probe": {str(st): sc for st, sc in scores.items()}, "heldout": {}}
    for name, state in models.items():
        if not problems:
            break
        model.load_state_dict(state)
        acc = heldout_accuracy(model, tok, problems, "chat", k=cfg.probe_k, seed=cfg.seed, desc=f"eval {name}")
        report["heldout"][name] = acc
        log(f"spectrum {name}: " + ", ".join(f"{k} {v:.1f}%" for k, v in acc.items()))
        metrics.write(step=step, spectrum=name, **acc)
    return fused, report


def main(cfg):
    run = start_run(cfg, "sft")  # lock, no accidental overwrite, saved settings on --resume, SIGTERM/SIGINT
    set_threads()
    rank, world, device = init_distributed(cfg.device)  # torchrun: one process per GPU (DDP); rank 0 saves
    kernels = pick_kernels(cfg.kernels, device)
    seed_everything(cfg.seed)
    # every input is read and validated before any training: a bad held-out row must not cost a run
    rows = load_examples(cfg.data, "answer", "SFT training")
    problems = load_examples(cfg.heldout, "target", "held-out", limit=cfg.n_eval) if cfg.n_eval > 0 else []
    model, tok, base_meta, _ = load_checkpoint(cfg.init_from, device, expect_stage=["pretrain", "sft", "import"],
                                               kernels=kernels)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    examples = tokenize_examples(tok, rows, model.cfg.max_seq_len, cfg.data)
    if problems:
        problems = fit_prompts(tok, problems, "chat", model.cfg.max_seq_len, cfg.max_new_tokens, "held-out problems")
        check_budget(tok, problems, cfg.max_new_tokens, "held-out")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps = math.ceil(cfg.epochs * len(examples) / global_batch)
    optimizer = make_optimizer(model, cfg, device)
    start = 0
    if cfg.resume:
        tuned, _, meta, _ = load_checkpoint(run.ckpt, device, expect_stage=["sft"], kernels=kernels)
        if meta.get("finished", True):
            run.close()
            log(f"nothing to do: {run.ckpt} is a finished SFT run (alpha {meta.get('alpha')} applied)")
            return
        model.load_state_dict(tuned.state_dict())
        start = load_training_state(run.ckpt, optimizer)["step"]
        log(f"resuming from {run.ckpt} at step {start}")
    metrics = Metrics(cfg.out_dir, resume_step=start if cfg.resume else None) if rank == 0 else None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank == 0:
        log(f"sft: {len(examples)} examples, {steps} steps of {global_batch}, device {device}, kernels {kernels}, "
            f"from {cfg.init_from}" + (f", {world} ranks" if world > 1 else ""))

    probe_sets, snapshots, scores = {}, {}, {}
    if cfg.probe_every > 0:
        for ex in load_examples(cfg.probe, "target", "probe"):  # held-out problems, as eval reads them
            if "subdomain" not in ex["row"]:
                raise SystemExit(f"error: {cfg.probe} rows need a 'subdomain' field; python tasks.py writes one")
            rows_k = probe_sets.setdefault(ex["row"]["subdomain"], [])
            if len(rows_k) < cfg.probe_n:
                rows_k.append(ex)
        log(f"spectrum SFT: probing every {cfg.probe_every} steps on {', '.join(probe_sets)} "
            f"({cfg.probe_n} problems each, pass@{cfg.probe_k})")

    def probe(step):  # 1. a snapshot, scored per sub-domain
        snapshots[step] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # off the GPU
        scores[step] = probe_snapshot(model, tok, probe_sets, cfg.probe_k, cfg.seed)
        metrics.write(step=step, **{f"probe_{kind}_{m}": v for kind, acc in scores[step].items() for m, v in acc.items()})
        log(f"step {step} probe: " + ", ".join(f"{kind} {acc[f'pass@{cfg.probe_k}']:.0f}%"
                                                      for kind, acc in scores[step].items()))
        model.train()

    def save(step):  # the fine-tuned weights as they are (alpha 1), to resume from
        save_checkpoint(cfg.out_dir, stage="sft", step=step, model=model, tok=tok, train_cfg=cfg, optimizer=optimizer,
                        extra={"fmt": "chat", "alpha": 1.0, "finished": False})

    rng = random.Random(cfg.seed)
    order = []

    def next_batch():
        nonlocal order
        if len(order) < global_batch:  # reshuffle each epoch
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [examples[i] for i in order[:global_batch]], order[global_batch:]
        return batch

    for _ in range(start):  # a resumed run replays the data order up to its step
        next_batch()
    model.train()
    bar = progress(range(start, steps), initial=start, total=steps, desc="sft", disable=rank != 0)
    for step in run.loop(bar, save):
        lr = lr_at(step, cfg, max_steps=steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = next_batch()
        # the loss is the mean over every assistant token of the global batch, however it is split into
        # micro-batches and ranks: each micro-batch's token mean is weighted by its share of the tokens
        # (x world: DDP averages the ranks' gradients)
        n_tokens = sum(sum(mask[1:]) for _, mask in batch)
        micros = [batch[i:i + cfg.batch_size] for i in range(0, global_batch, cfg.batch_size)]
        loss_sum = 0.0
        for m in range(rank, len(micros), world):
            x, y = collate(micros[m], device)
            last_micro = m + world >= len(micros)
            with autocast(device), grad_sync(train_model, last_micro):
                loss = train_model(x, y) * ((y != -100).sum() * world / max(n_tokens, 1))
                check_finite(loss, "the loss", step, cfg.out_dir)
                loss.backward()
            loss_sum += loss.item() / world
        if world > 1:
            loss_sum = ranks_reduce(loss_sum)  # the sum over ranks of each rank's share
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        check_finite(gnorm, "the gradient norm", step, cfg.out_dir)
        gnorm = gnorm.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and ((step + 1) % cfg.log_interval == 0 or step + 1 == steps):
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}")
            metrics.write(step=step + 1, loss=loss_sum, lr=lr, grad_norm=gnorm)
        if rank == 0 and probe_sets and ((step + 1) % cfg.probe_every == 0 or step + 1 == steps):
            probe(step + 1)  # the other ranks wait for rank 0 at the next step's gradient all-reduce
        if rank == 0 and (step + 1) % cfg.ckpt_interval == 0 and step + 1 < steps:
            save(step + 1)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:  # the report generates on one process; rank 0 saves
        run.close()
        return

    # weight interpolation with the base (VibeThinker-style checkpoint fusion, with the base as anchor)
    sft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = {}

    def save_final(report):
        model.load_state_dict(interpolate(base_state, sft_state, cfg.alpha))
        save_checkpoint(cfg.out_dir, stage="sft", step=steps, model=model, tok=tok, train_cfg=cfg,
                        extra={"fmt": "chat", "alpha": cfg.alpha, "alpha_report": report, "finished": True,
                               "fused": cfg.save_fused and "spectrum" in extra, **extra})

    save_final({})  # the trained model is on disk before the reports below spend any time
    log(f"sft: checkpoint (alpha={cfg.alpha}) saved in {os.path.join(cfg.out_dir, 'ckpt')}")
    if probe_sets:  # 2-4. specialists, fusion, report
        fused, extra["spectrum"] = spectrum_report(model, tok, snapshots, scores, problems, cfg, metrics, steps)
        if cfg.save_fused:
            sft_state = fused
    report = {}
    for alpha in sorted({0.0, 1.0, cfg.alpha}):
        if not problems:
            break
        model.load_state_dict(interpolate(base_state, sft_state, alpha))
        acc = heldout_accuracy(model, tok, problems, "chat", k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed, desc=f"eval alpha={alpha}")
        report[str(alpha)] = acc
        log(f"alpha {alpha:.2f}: " + ", ".join(f"{k} {v:.1f}%" for k, v in acc.items()))
        metrics.write(step=steps, alpha=alpha, **acc)
    if cfg.save_fused and "spectrum" in extra:
        save_final(report)  # the fused weights replace the ones saved above
    elif report or extra:  # same weights: only the reports join the checkpoint's meta.json
        update_checkpoint_meta(os.path.join(cfg.out_dir, "ckpt"), alpha_report=report, **extra)
    run.close()
    log(f"sft done: checkpoint (alpha={cfg.alpha}) in {os.path.join(cfg.out_dir, 'ckpt')}")


if __name__ == "__main__":
    main(parse_config(SFTConfig()))
