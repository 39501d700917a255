"""
Pretraining from token shards (data.py's format).

    python pretrain.py --model=tiny --data_dir=out/data --out_dir=out/pretrain
    python pretrain.py --model=cpu --data_dir=out/tinystories --out_dir=out/pretrain_cpu   # ~12M params, a laptop CPU
    python pretrain.py --model=cpu --n_layer=8 --d_model=512 --n_head=8 ...   # any size: the flags override a preset
    python pretrain.py --model=135m --data_dir=out/fineweb --batch_size=32 --grad_accum=16 --max_steps=20000
    python pretrain.py ... --resume=true        # continue from <out_dir>/ckpt

AdamW, linear warmup then cosine decay to min_lr, gradient accumulation and clipping, bf16 autocast
on CUDA, periodic validation loss (with a few sampled lines, to read what the model has learned),
tokens/s and MFU, metrics as JSON lines in <out_dir>/metrics.jsonl.
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from common import (Metrics, autocast, check_finite, gather_full, grad_sync, init_distributed, load_checkpoint,
                    load_sharded_optimizer, load_training_state, log, parse_config, pick_kernels, progress,
                    ranks_reduce, save_checkpoint, seed_everything, set_threads, shard_model, start_run)
from engine import generate
from memory import auto_micro_batch
from shards import load_shards, sample_batch
from model import GPT, SIZE_FLAGS, model_config
from tokenizer import load_tokenizer


@dataclass
class PretrainConfig:
    model: str = "tiny"            # model preset (model.py PRESETS): tiny (~1M), cpu (~12M), 135m (SmolLM2-135M)
    n_layer: int = 0               # the size dials: each overrides the preset when > 0
    d_model: int = 0               # model width (0 = the preset's)
    n_head: int = 0                # query heads (0 = the preset's)
    n_kv_head: int = 0             # key/value heads, divides n_head (0 = the preset's)
    d_ff: int = 0                  # SwiGLU hidden width (0 = the preset's)
    data_dir: str = "out/data"     # token shards + tokenizer.json
    out_dir: str = "out/pretrain"
    init_from: str = ""            # continue from another checkpoint's weights (new optimizer)
    resume: bool = False           # continue this run from <out_dir>/ckpt, optimizer, data position and settings included
    overwrite: bool = False        # replace a previous run's checkpoints and metrics in out_dir
    allow_config_change: bool = False  # on resume, apply flags that differ from the saved run's settings
    keep_last: int = 2             # checkpoints kept: ckpt/ plus the previous ones as ckpt-<step>/
    batch_size: int = 32           # sequences per micro-batch (per rank)
    seq_len: int = 128
    grad_accum: int = 1            # micro-batches per step; global batch = batch_size x grad_accum x ranks
    micro_batch: str = ""          # "auto": the largest micro-batch that fits the device; grad_accum keeps the global batch
    max_steps: int = 600
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    sample_lines: int = 3          # lines sampled from <|bos|> and printed at each evaluation (0 = none)
    sample_tokens: int = 48        # tokens per sampled line
    ckpt_interval: int = 200
    log_interval: int = 20
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False  # keep only each block's input; rebuild activations in the backward
    fsdp: bool = False             # under torchrun: shard weights, gradients and AdamW state across ranks (FSDP2)
                                   # instead of a copy per rank (DDP); checkpoints are gathered whole to rank 0
    peak_tflops: float = 0.0       # for MFU; 0 = guess from the GPU name (H100/H200/A100), none on CPU


def lr_at(step, cfg, max_steps=None):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps (default cfg.max_steps)."""
    max_steps = cfg.max_steps if max_steps is None else max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def flops_per_token(model, seq_len):
    """Forward+backward FLOPs per token: 6N for the weights plus attention's 12·L·d·T (PaLM appendix B)."""
    c = model.cfg
    # with tied embeddings every parameter is in one matmul: the table is the output projection
    return 6 * model.num_params() + 12 * c.n_layer * c.d_model * seq_len


def peak_flops(cfg, device):
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, tf in (("H200", 989), ("H100", 989), ("A100", 312), ("L4", 121), ("4090", 165), ("3090", 71)):
        if key in name:
            return tf * 1e12  # dense bf16
    return None


def make_optimizer(model, cfg, device):
    # no weight decay on norms (1-D parameters)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=torch.device(device).type == "cuda")


@torch.no_grad()
def val_loss(model, shards, cfg, device):
    rng = np.random.default_rng(0)  # the same validation windows at every evaluation
    model.eval()
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = sample_batch(shards, cfg.batch_size, cfg.seq_len, rng)
        with autocast(device):
            losses.append(model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)).item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def sample_text(model, tok, cfg, device):
    """cfg.sample_lines short continuations of <|bos|> (temperature 0.8, top-k 50, a fixed seed so
    successive evaluations are comparable), newlines shown as '⏎'."""
    if cfg.sample_lines <= 0:
        return []
    n = min(cfg.sample_tokens, model.cfg.max_seq_len - 1)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    outs = generate(model, [[tok.bos_id]] * cfg.sample_lines, n, stop_tokens=[tok.bos_id], temperature=0.8, top_k=50,
                    generator=gen)
    model.train(was_training)
    return [tok.decode(o).replace("\n", "⏎ ") for o in outs]


def main(cfg):
    run = start_run(cfg, "pretrain")  # lock, no accidental overwrite, saved settings on --resume, SIGTERM/SIGINT
    set_threads()
    # under torchrun: one process per GPU, each with the whole model (DDP); rank 0 logs and saves
    rank, world, device = init_distributed(cfg.device)
    kernels = pick_kernels(cfg.kernels, device)
    seed_everything(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)  # the same on every rank: all ranks draw the same global batch
    start_step = 0

    if cfg.resume:
        model, tok, meta, ckpt = load_checkpoint(run.ckpt, device, expect_stage=["pretrain"], kernels=kernels)
    elif cfg.init_from:
        model, tok, meta, ckpt = load_checkpoint(cfg.init_from, device, kernels=kernels)
    else:
        tok = load_tokenizer(os.path.join(cfg.data_dir, "tokenizer.json"))
        sizes = {k: getattr(cfg, k) for k in SIZE_FLAGS}
        model = GPT(model_config(cfg.model, vocab_size=tok.vocab_size, kernels=kernels, **sizes)).to(device)
    train_shards = load_shards(cfg.data_dir, "train", expect_tokenizer=tok.fingerprint)
    val_shards = load_shards(cfg.data_dir, "val", expect_tokenizer=tok.fingerprint)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise SystemExit(f"error: --seq_len={cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    fsdp = cfg.fsdp and world > 1
    if fsdp:  # before the optimizer: its parameters are this rank's shards
        shard_model(model)
        run.collective_save = True  # a checkpoint gathers the weights from every rank
    optimizer = make_optimizer(model, cfg, device)
    if cfg.resume:
        meta = load_training_state(ckpt, None if fsdp else optimizer, np_rng)
        if fsdp:
            load_sharded_optimizer(model, optimizer, os.path.join(ckpt, "optim.pt"))
        start_step = meta["step"]
        log(f"resuming from {ckpt} at step {start_step}")
    metrics = Metrics(cfg.out_dir, resume_step=start_step if cfg.resume else None) if rank == 0 else None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.micro_batch == "auto":
        global_batch = cfg.batch_size * cfg.grad_accum
        cfg.batch_size, cfg.grad_accum = auto_micro_batch(model, global_batch, cfg.seq_len, device, kernels)
        if rank == 0:
            log(f"micro_batch=auto: {cfg.batch_size} sequences of {cfg.seq_len} tokens fit {device}; grad_accum "
                f"{cfg.grad_accum} keeps the global batch of {global_batch} per rank")
    elif cfg.micro_batch:
        raise SystemExit(f"error: --micro_batch takes 'auto' (or nothing), got '{cfg.micro_batch}'")
    train_model = model
    if world > 1 and not fsdp:  # gradients are averaged across ranks in the backward of each rank's last micro-step
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    step_model = torch.compile(train_model) if cfg.compile else train_model

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    fpt, peak = flops_per_token(model, cfg.seq_len), peak_flops(cfg, device)
    if rank == 0:
        log(f"pretrain: {model.num_params() / 1e6:.2f}M params, device {device}, kernels {kernels}, "
            f"{tokens_per_step} tokens/step, {cfg.max_steps} steps, tokenizer {tok.name} ({tok.vocab_size})"
            + (f", {world} ranks" if world > 1 else ""))
    def save(step, vloss=None, gathered=None):
        m, opt = gathered or (gather_full(model, optimizer, device) if fsdp else (model, optimizer))
        if m is None:  # FSDP: a rank other than 0, its part gathered
            return
        save_checkpoint(cfg.out_dir, stage="pretrain", step=step, model=m, tok=tok, train_cfg=cfg,
                        optimizer=opt, np_rng=np_rng, extra={"val_loss": vloss, "fmt": "plain"})

    model.train()
    t0, tokens_since = time.time(), 0
    vloss = None
    bar = progress(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="pretrain",
                   disable=rank != 0)
    for step in run.loop(bar, save):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        # every rank draws the global batch's grad_accum x world micro-batches and trains on its share,
        # so N ranks x grad_accum A see exactly the data of 1 rank x grad_accum N*A
        for micro in range(cfg.grad_accum * world):
            x, y = sample_batch(train_shards, cfg.batch_size, cfg.seq_len, np_rng)
            if micro % world != rank:
                continue
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            last_micro = micro + world >= cfg.grad_accum * world
            with autocast(device), grad_sync(train_model, last_micro):
                loss = step_model(x, y) / cfg.grad_accum
                check_finite(loss, "the loss", step, cfg.out_dir)
                loss.backward()
            loss_sum += loss.item()
        if world > 1:  # the logged loss is the mean over all ranks, as one process would see it
            loss_sum = ranks_reduce(loss_sum) / world
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()  # FSDP: a DTensor
        check_finite(gnorm, "the gradient norm", step, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += tokens_per_step

        last = step + 1 == cfg.max_steps
        evaluate, checkpoint = (step + 1) % cfg.eval_interval == 0 or last, (step + 1) % cfg.ckpt_interval == 0 or last
        # FSDP: every rank gathers; the optimizer state only when a checkpoint is written
        gathered = (gather_full(model, optimizer if checkpoint else None, device)
                    if fsdp and (evaluate or checkpoint) else None)
        if rank != 0:
            continue
        eval_model = gathered[0] if gathered else model  # FSDP: the full weights, gathered on rank 0
        if (step + 1) % cfg.log_interval == 0 or last:
            dt = time.time() - t0
            tps = tokens_since / dt
            mfu = tps * fpt / peak if peak else None
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:.0f}")
            metrics.write(step=step + 1, loss=loss_sum, lr=lr, grad_norm=gnorm, tokens_per_s=tps, mfu=mfu)
            t0, tokens_since = time.time(), 0
        if evaluate:
            vloss = val_loss(eval_model, val_shards, cfg, device)  # the bare model: DDP forwards are collective
            bar.write(f"step {step + 1}: train loss {loss_sum:.4f}, val loss {vloss:.4f}")
            metrics.write(step=step + 1, val_loss=vloss)
            for line in sample_text(eval_model, tok, cfg, device):
                bar.write(f"  sample: {line}")
        if checkpoint:
            save(step + 1, vloss, gathered)
    bar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    run.close()
    if rank != 0:
        return
    if start_step >= cfg.max_steps:
        log(f"nothing to do: checkpoint is already at step {start_step} >= max_steps {cfg.max_steps}")
    log(f"pretrain done: val loss {vloss}, checkpoint in {os.path.join(cfg.out_dir, 'ckpt')}")


if __name__ == "__main__":
    main(parse_config(PretrainConfig()))
