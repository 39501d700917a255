"""
Reinforcement learning from verifiable rewards: GRPO (DeepSeekMath, arXiv 2402.03300).

    python grpo.py --init_from=out/sft --data=out/data/rl.jsonl --out_dir=out/grpo

One iteration, top to bottom in `main`:
  1. draw `prompts_per_iter` problems and sample `group_size` completions for each (temperature),
  2. reward = 1 if the number after '####' equals the answer, else 0,
  3. advantage of each completion = (reward - group mean) / (group std + eps)       group_advantages
  4. per-token log-probs under the policy; the clipped-ratio surrogate, each sequence's token
     losses averaged over its length, then over sequences, plus an optional k3 KL to the frozen
     starting policy                                                                  grpo_loss
  5. `ppo_epochs` optimizer steps on that batch (1 = strictly on-policy: the ratio is 1 and the
     clip never binds, as in most small-model recipes).
Logged per iteration: reward mean, accuracy, KL to the reference, mean response length, the fraction
of groups whose rewards are all equal (they carry no learning signal), the clipped-token fraction.
"""
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (Metrics, autocast, check_finite, load_checkpoint, load_training_state, log, parse_config,
                    pick_device, pick_kernels, save_checkpoint, seed_everything, start_run, check_model)
from eval import heldout_accuracy
from model import generate
from tasks import exact_match_reward, prompt_ids, read_jsonl


@dataclass
class GRPOConfig:
    init_from: str = "out/sft"
    data: str = "out/data/rl.jsonl"          # rows {"question", "target"} (or GSM8K {"question", "answer"})
    heldout: str = "out/data/heldout.jsonl"
    out_dir: str = "out/grpo"
    resume: bool = False                     # continue this run from <out_dir>/ckpt, settings included
    overwrite: bool = False                  # replace a previous run's checkpoints and metrics in out_dir
    allow_config_change: bool = False        # on resume, apply flags that differ from the saved run's settings
    keep_last: int = 2                       # checkpoints kept: ckpt/ plus the previous ones as ckpt-<step>/
    iterations: int = 40
    prompts_per_iter: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    micro_batch: int = 64                    # sequences per forward/backward (gradient accumulation)
    clip_eps: float = 0.2
    kl_coef: float = 0.0                     # weight of the k3 KL penalty to the starting policy (0 = none)
    log_kl: bool = True                      # keep the starting policy as reference to log the KL even at kl_coef=0
    adv_eps: float = 1e-4
    eval_interval: int = 10
    n_eval: int = 200
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"


def group_advantages(rewards, eps=1e-4):
    """rewards (P, G) -> advantages (P, G): standardized within each prompt's group."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)  # unbiased, as in DeepSeekMath / TRL
    return (rewards - mean) / (std + eps)


def grpo_loss(logp, old_logp, advantages, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0):
    """The GRPO objective, negated for minimization.

    logp, old_logp, ref_logp: (N, T) per-token log-probs of the sampled tokens under the policy
    being trained, the policy that sampled them, and the reference; advantages: (N,); mask: (N, T),
    1 on completion tokens. Returns (loss, stats)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    kl = None
    if ref_logp is not None:
        # k3 estimator of KL(pi || ref): unbiased, always >= 0 (Schulman, "Approximating KL divergence")
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token + kl_coef * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = per_seq.mean()
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"clip_frac": ((clipped * mask).sum() / n).item()}
        if kl is not None:
            stats["kl"] = ((kl * mask).sum() / n).item()
    return loss, stats


def rollout_batch(tok, prompts, completions, device):
    """Prompt+completion rows -> (x, y, mask): inputs, next-token targets, 1 on completion targets."""
    rows = [p + c for p, c in zip(prompts, completions)]
    L = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        n = len(r) - 1
        x[b, :n] = torch.tensor(r[:-1])
        y[b, :n] = torch.tensor(r[1:])
        mask[b, len(p) - 1:n] = 1.0
    return x.to(device), y.to(device), mask.to(device)


def sequence_logprobs(model, x, y, micro_batch, device):
    out = []
    for i in range(0, len(x), micro_batch):
        with autocast(device):
            out.append(model.token_logprobs(x[i:i + micro_batch], y[i:i + micro_batch]).float())
    return torch.cat(out)


def target_of(row):
    if "target" in row:
        return row["target"]
    return row["answer"].rsplit("####", 1)[1].strip()


def main(cfg):
    run = start_run(cfg, "grpo")  # lock, no accidental overwrite, saved settings on --resume, SIGTERM/SIGINT
    device = pick_device(cfg.device)
    kernels = pick_kernels(cfg.kernels, device)
    seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.group_size < 2:
        raise SystemExit("error: --group_size must be >= 2: advantages are relative to the other samples of a group")
    src = run.ckpt if cfg.resume else cfg.init_from
    model, tok, meta, ckpt = load_checkpoint(src, device, expect_stage=["sft", "grpo"], kernels=kernels)
    ref = None
    ref_from = meta.get("ref_from", src) if cfg.resume else src  # the policy GRPO started from, kept across resumes
    if cfg.kl_coef > 0 or cfg.log_kl:
        ref, _, _, _ = load_checkpoint(ref_from, device, kernels=kernels)
        ref.requires_grad_(False).eval()
    rows = read_jsonl(cfg.data)
    problems = read_jsonl(cfg.heldout)[:cfg.n_eval] if cfg.n_eval > 0 else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        start = load_training_state(ckpt, optimizer)["step"]
        log(f"resuming from {ckpt} at iteration {start}")
    metrics = Metrics(cfg.out_dir, resume_step=start if cfg.resume else None)
    log(f"grpo: {len(rows)} prompts, {cfg.iterations} iterations x {cfg.prompts_per_iter} prompts x "
        f"{cfg.group_size} samples, device {device}, kernels {kernels}, from {src}")

    def evaluate(it):
        if problems:
            acc = heldout_accuracy(model, tok, problems, "chat", k=0)
            metrics.write(step=it, heldout_pass1=acc["pass@1"])
            tqdm.write(f"iter {it}: held-out pass@1 {acc['pass@1']:.1f}%")
            return acc["pass@1"]

    def save(it):
        save_checkpoint(cfg.out_dir, stage="grpo", step=it, model=model, tok=tok, train_cfg=cfg,
                        optimizer=optimizer, extra={"fmt": "chat", "ref_from": ref_from})

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="grpo", dynamic_ncols=True)
    for it in run.loop(bar, save):
        t0 = time.time()
        # 1. sample: a fresh, seeded draw per iteration, so --resume needs no sampler state
        rng = random.Random(cfg.seed * 100003 + it)
        batch = rng.sample(rows, cfg.prompts_per_iter)
        prompts = [prompt_ids(tok, r["question"], "chat") for r in batch for _ in range(cfg.group_size)]
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100003 + it)
        model.eval()
        completions = []
        for i in range(0, len(prompts), 256):
            completions += generate(model, prompts[i:i + 256], cfg.max_new_tokens, stop_id=tok.end_id,
                                    temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
        model.train()
        # 2. rewards, 3. advantages
        targets = [target_of(r) for r in batch for _ in range(cfg.group_size)]
        rewards = torch.tensor([exact_match_reward(tok.decode(c), t) for c, t in zip(completions, targets)])
        rewards = rewards.view(cfg.prompts_per_iter, cfg.group_size)
        advantages = group_advantages(rewards, cfg.adv_eps).flatten().to(device)
        # 4. log-probs of the sampled tokens under the sampling policy (and the reference)
        x, y, mask = rollout_batch(tok, prompts, completions, device)
        with torch.no_grad():
            old_logp = sequence_logprobs(model, x, y, cfg.micro_batch, device)
            ref_logp = sequence_logprobs(ref, x, y, cfg.micro_batch, device) if ref is not None else None
        # 5. policy update
        n = len(x)
        for _ in range(cfg.ppo_epochs):
            stats_sum = {}
            for i in range(0, n, cfg.micro_batch):
                sl = slice(i, i + cfg.micro_batch)
                with autocast(device):
                    logp = model.token_logprobs(x[sl], y[sl]).float()
                loss, stats = grpo_loss(logp, old_logp[sl], advantages[sl], mask[sl], cfg.clip_eps,
                                        None if ref_logp is None else ref_logp[sl], cfg.kl_coef)
                loss = loss * len(x[sl]) / n  # micro-batches add up to the mean over all sequences
                check_finite(loss, "the loss", it, cfg.out_dir)
                loss.backward()
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v * len(x[sl]) / n
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            check_finite(gnorm, "the gradient norm", it, cfg.out_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        check_model(model, it + 1, cfg.out_dir)  # a blown-up policy stops here, not in the next sampling

        all_equal = (rewards.max(1).values == rewards.min(1).values).float().mean().item()
        row = dict(step=it + 1, reward=rewards.mean().item(), accuracy=rewards.mean().item(),
                   response_len=sum(len(c) for c in completions) / len(completions), frac_all_equal=all_equal,
                   seconds=time.time() - t0, **stats_sum)
        metrics.write(**row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['response_len']:.0f}", eq=f"{all_equal:.2f}")
        if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.iterations:
            evaluate(it + 1)
            save(it + 1)
    bar.close()
    run.close()
    log(f"grpo done: checkpoint in {os.path.join(cfg.out_dir, 'ckpt')}")


if __name__ == "__main__":
    main(parse_config(GRPOConfig()))
