"""
Supervised fine-tuning on chat data, loss on the assistant's tokens only, then weight
interpolation with the base: theta = (1 - alpha) * theta_base + alpha * theta_sft.

    python sft.py --init_from=out/pretrain --data=out/data/sft.jsonl --out_dir=out/sft --alpha=0.9

Data: JSONL rows {"question", "answer"} (GSM8K style), or {"messages": [{"role", "content"}, ...]}
with one user turn followed by one assistant turn. Held-out accuracy is reported at alpha = 0, 1 and
the chosen alpha; the checkpoint written holds the chosen alpha's weights.
"""
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (Metrics, autocast, check_finite, init_distributed, load_checkpoint, load_training_state, log,
                    parse_config, pick_kernels, save_checkpoint, seed_everything, start_run, update_checkpoint_meta)
from eval import heldout_accuracy
from pretrain import all_ranks_mean, lr_at, make_optimizer
from tasks import chat_example_ids, read_jsonl


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
    n_eval: int = 200              # held-out problems for the alpha report
    k: int = 8                     # pass@k in that report
    log_interval: int = 20
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"


def example_fields(row, path, i):
    if "messages" in row:
        msgs = row["messages"]
        if len(msgs) != 2 or msgs[0].get("role") != "user" or msgs[1].get("role") != "assistant":
            raise SystemExit(f"error: {path} row {i}: expected messages = [user, assistant]")
        return msgs[0]["content"], msgs[1]["content"]
    if "question" not in row or "answer" not in row:
        raise SystemExit(f"error: {path} row {i} has neither question/answer nor messages fields")
    return row["question"], row["answer"]


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


def main(cfg):
    run = start_run(cfg, "sft")  # lock, no accidental overwrite, saved settings on --resume, SIGTERM/SIGINT
    rank, world, device = init_distributed(cfg.device)  # torchrun: one process per GPU (DDP); rank 0 saves
    kernels = pick_kernels(cfg.kernels, device)
    seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    model, tok, base_meta, _ = load_checkpoint(cfg.init_from, device, expect_stage=["pretrain", "sft"],
                                               kernels=kernels)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = read_jsonl(cfg.data)
    examples = []
    for i, row in enumerate(rows):
        ids, mask = chat_example_ids(tok, *example_fields(row, cfg.data, i + 1))
        if len(ids) > model.cfg.max_seq_len:
            continue
        examples.append((ids, mask))
    if not examples:
        raise SystemExit(f"error: no usable examples in {cfg.data}")
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
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="sft", dynamic_ncols=True, disable=rank != 0)
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
            with autocast(device), (train_model.no_sync() if world > 1 and not last_micro else nullcontext()):
                loss = train_model(x, y) * ((y != -100).sum() * world / max(n_tokens, 1))
                check_finite(loss, "the loss", step, cfg.out_dir)
                loss.backward()
            loss_sum += loss.item() / world
        if world > 1:
            loss_sum = all_ranks_mean(loss_sum, device) * world
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        check_finite(gnorm, "the gradient norm", step, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and ((step + 1) % cfg.log_interval == 0 or step + 1 == steps):
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}")
            metrics.write(step=step + 1, loss=loss_sum, lr=lr)
        if rank == 0 and (step + 1) % cfg.ckpt_interval == 0 and step + 1 < steps:
            save(step + 1)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:  # the report generates on one process; rank 0 saves
        run.close()
        return

    # weight interpolation with the base (VibeThinker-style checkpoint fusion, with the base as anchor)
    sft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # saved first, so a failure in the report below loses no training; the report is added to its meta.json
    model.load_state_dict(interpolate(base_state, sft_state, cfg.alpha))
    ckpt = save_checkpoint(cfg.out_dir, stage="sft", step=steps, model=model, tok=tok, train_cfg=cfg,
                           extra={"fmt": "chat", "alpha": cfg.alpha, "finished": True})
    problems = read_jsonl(cfg.heldout)[:cfg.n_eval] if cfg.n_eval > 0 else []
    report = {}
    for alpha in sorted({0.0, 1.0, cfg.alpha}):
        if not problems:
            break
        model.load_state_dict(interpolate(base_state, sft_state, alpha))
        acc = heldout_accuracy(model, tok, problems, "chat", k=cfg.k, seed=cfg.seed, desc=f"eval alpha={alpha}")
        report[str(alpha)] = acc
        log(f"alpha {alpha:.2f}: " + ", ".join(f"{k} {v:.1f}%" for k, v in acc.items()))
        metrics.write(step=steps, alpha=alpha, **acc)
    update_checkpoint_meta(ckpt, alpha_report=report)
    run.close()
    log(f"sft done: checkpoint (alpha={cfg.alpha}) in {os.path.join(cfg.out_dir, 'ckpt')}")


if __name__ == "__main__":
    main(parse_config(SFTConfig()))
