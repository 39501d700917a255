"""
Reinforcement learning from verifiable rewards: GRPO (DeepSeekMath, arXiv 2402.03300) and the small-model
recipes built on it, as named options of one config (TRL's GRPOConfig names where TRL has them).

    python grpo.py --init_from=out/sft --data=out/data/rl.jsonl --out_dir=out/grpo
    python grpo.py --recipe=dapo --epsilon_high=0.3 ...   # a preset; explicit flags override it

One iteration, top to bottom in `main`:
  1. sample (`rollout`): draw `prompts_per_iter` problems and sample `group_size` (TRL: num_generations)
     completions for each at `temperature` / `top_p`, with a response budget that may follow a schedule
     (`max_new_tokens_schedule`, ProRL 8k -> 16k). Problems are drawn from pools by share (largest
     remainders per iteration, `draw_prompts`): one pool = a plain draw; `mix` ("kind:share,...", ProRL's
     mixing of task kinds) makes one pool per row kind; `difficulty_mix` one per file (Open-RS easy/hard).
     Prompts are rendered by the renderer SFT and eval use (tasks.example_prompt_ids: a `messages` row is
     the whole conversation before its last assistant turn); prompts that cannot fit in the context with
     the largest response budget are skipped up front and counted (eval.fit_prompts). Dynamic sampling
     (DAPO Alg. 1, ProRL) drops groups whose correctness is all equal and draws more prompts until
     `prompts_per_iter` informative groups are in, at most `max_sampling_rounds` rounds. Before the first
     iteration an optional difficulty pre-filter (VibeThinker-3B) drops the training prompts the starting
     policy always or never solves.
  2. rewards (`score`): a weighted sum (`reward_funcs`, `reward_weights`) of correctness (verifiers.score_examples: a
     word-problem row's exact answer with the evaluation's extractor; a row of another kind (code,
     code_output, math, logic, ifeval) its verifier's score in [0, 1] from verifiers.score_batch, e.g. the
     fraction of unit tests passed in the sandbox as ProRL; a row its verifier cannot judge scores 0),
     format, Open-RS's cosine length reward (Yeo et al.) and DAPO's soft overlong punishment. Binary
     correctness (correctness >= verifiers.CORRECT) is kept beside the shaped reward: dynamic sampling,
     MGPO and the pass rates read it, never the shaped sum.
  3. advantages (`group_advantages`): r - group mean (GRPO), or the leave-one-out baseline (RLOO), divided
     by the group's std (GRPO), the batch's std (`scale_rewards=batch`) or nothing (Dr. GRPO); a group
     whose rewards are all equal gets exactly 0; MGPO (VibeThinker) weights each group by
     exp(-lambda * KL(Bern(p) || Bern(0.5))), p its pass rate.
  4. per-token log-probs of the sampled tokens under the sampling policy (and the reference), at the
     sampling temperature (logits / T, as TRL and verl do).
  5. `num_iterations` (PPO epochs, mu) passes of optimizer steps on that batch (`grpo_loss`): the clipped
     ratio with decoupled bounds 1-epsilon, 1+epsilon_high (DAPO clip-higher) per token or per sequence
     (GSPO), plus beta * k3 KL to the reference; aggregated as `loss_type` (grpo: mean over sequences of
     token means; dapo: token sum / token count of the whole batch; dr_grpo: token sum / (sequences *
     max_new_tokens)) with the normaliser fixed before the micro-batch loop, so gradient accumulation
     gives the gradient of one big batch. Truncated completions can be left out (`mask_truncated_completions`).
  6. ProRL's hard reset: the reference becomes the current policy (and, `reset_optimizer`, the optimizer
     state is cleared) every `ref_reset_every` iterations or when held-out pass@1 has not improved for
     `ref_reset_patience` evaluations.
Logged per iteration: reward (the shaped, weighted sum), accuracy (binary correctness: the fraction of
completions whose correctness reward is >= verifiers.CORRECT; logged only when it can differ from the reward,
see accuracy_differs: with the default `correctness` reward on 0/1 verifiers it is the same number), KL, response length,
truncation rate, the fraction of sampled groups whose correctness is all equal (no learning signal),
dynamic-sampling rounds and drops, clip fractions (low side, high side), mean |advantage|, MGPO's mean
weight, the gradient norm before clipping and the policy entropy (mean over the sampled completion tokens
of -sum_v p log p, p = softmax(logits / T) of the policy that sampled them, from the first update pass's
forward: no extra model forward). When the training data has several row kinds, reward, accuracy and
response length also per kind (reward/<kind>, accuracy/<kind>, response_len/<kind>), and the held-out
pass@1 per kind (heldout_pass1/<kind>, eval.heldout_accuracy's). Up front: the count of prompts skipped
as too long, and a warning when most reference answers are longer than max_new_tokens (eval.check_budget);
the first iteration whose truncation rate exceeds eval.TRUNCATION_WARN prints a warning (once a run).
Presets: RECIPES below.
"""
import collections
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import (Metrics, atomic_write, autocast, check_finite, load_checkpoint, load_training_state, log, parse_config,
                    init_distributed, pick_kernels, progress, ranks, ranks_gather_object, ranks_reduce, save_checkpoint,
                    seed_everything, set_threads, start_run, check_model)
from eval import TRUNCATION_WARN, check_budget, fit_prompts, heldout_accuracy, warn_truncation
from engine import Engine, stop_tokens_for
from model import output_logprobs
from tasks import example_prompt_ids, extract_answer, load_examples
from verifiers import BINARY_KINDS, CORRECT, KINDS, kind_of, score_examples


@dataclass
class GRPOConfig:
    init_from: str = "out/sft"
    data: str = "out/data/rl.jsonl"          # rows of tasks.ROW_FORMATS: {"question", "target"}, GSM8K, messages,
                                             # or verifiers.py rows of another "kind" (code, code_output, math, ...)
    mix: str = ""                            # share of each row kind per iteration, "kind:share,..." normalised
                                             # (ProRL; e.g. gsm8k:0.7,code_output:0.3); "" = drawn as the data has them
    sandbox: str = "auto"                    # isolation for model-run code (code, code_output rows): auto, bwrap,
                                             # unshare, none (= accept weaker isolation; verifiers.py)
    heldout: str = "out/data/heldout.jsonl"
    out_dir: str = "out/grpo"
    resume: bool = False                     # continue this run from <out_dir>/ckpt, settings included
    overwrite: bool = False                  # replace a previous run's checkpoints and metrics in out_dir
    allow_config_change: bool = False        # on resume, apply flags that differ from the saved run's settings
    keep_last: int = 2                       # checkpoints kept: ckpt/ plus the previous ones as ckpt-<step>/
    recipe: str = ""                         # preset: grpo|dapo|dr_grpo|prorl|openrs|mgpo (RECIPES); flags override
    iterations: int = 40
    prompts_per_iter: int = 16
    group_size: int = 8                      # TRL's num_generations: completions per prompt
    # sampling and curriculum
    temperature: float = 1.0                 # ProRL 1.2
    top_p: float = 1.0
    max_new_tokens: int = 64                 # the response budget (TRL's max_completion_length)
    max_new_tokens_schedule: str = ""        # "iter:tokens,..." from that iteration on; iter with a '.' = fraction
                                             # of iterations, tokens ending in 'x' = multiple of max_new_tokens
                                             # (ProRL 8k -> 16k late: "0.9:2x")
    dynamic_sampling: bool = False           # DAPO/ProRL: keep only groups with 0 < pass rate < 1, draw more
    max_sampling_rounds: int = 10            # cap on dynamic-sampling rounds per iteration (verl: 10)
    prefilter_samples: int = 0               # difficulty pre-filter (VibeThinker-3B): k samples per prompt, drop
                                             # prompts at pass rate 0 or 1 under the starting policy (0 = off)
    prefilter_pool: int = 0                  # prompts measured by the pre-filter (0 = all training prompts)
    difficulty_mix: str = ""                 # Open-RS easy/hard mixing: "path:ratio,path:ratio" (replaces data;
                                             # not together with mix)
    # rewards
    reward_funcs: str = "correctness"        # comma list of correctness, format, cosine, overlong
    answer_match: str = "strict"             # correctness by tasks.extract_answer: strict (first '#### N') | flexible
    reward_weights: str = ""                 # comma list of floats, one per reward func ("" = all 1)
    soft_punish_cache: int = 0               # DAPO overlong: L_cache tokens before the budget (L_max) (0 = off)
    cosine_min_value_wrong: float = -1.0     # Open-RS/Yeo cosine reward, lengths in tokens, progress clamped
    cosine_max_value_wrong: float = -0.5     # a wrong answer: -1 when short, -0.5 at the budget
    cosine_min_value_correct: float = 0.5    # a correct answer: 1 when short, 0.5 at the budget
    cosine_max_value_correct: float = 1.0    # (the correct-answer ends: 1 short, 0.5 at the budget)
    cosine_max_len: int = 0                  # tokens (0 = the current response budget)
    # advantages
    advantage: str = "grpo"                  # grpo: r - mean | rloo: r - mean of the others = G/(G-1) (r - mean)
    scale_rewards: str = "group"             # group (GRPO) | batch | none (Dr. GRPO)
    mgpo_lambda: float = 0.0                 # MGPO entropy-deviation weight (VibeThinker; 0 = off)
    adv_eps: float = 1e-4                    # added to the std (TRL 1e-4)
    # loss
    loss_type: str = "grpo"                  # grpo | dapo | dr_grpo (see grpo_loss)
    epsilon: float = 0.2                     # clip: ratio in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.0                # 0 = same as epsilon (DAPO 0.28, ProRL 0.4)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    mask_truncated_completions: bool = False  # DAPO overlong filtering: truncated completions out of the loss
    num_iterations: int = 1                  # PPO epochs on each batch (mu); > 1 moves the ratio off 1
    beta: float = 0.0                        # weight of the k3 KL to the reference (DeepSeekMath 0.04)
    log_kl: bool = True                      # keep a reference to log the KL even at beta = 0
    ref_reset_every: int = 0                 # ProRL hard reset of the reference every N iterations (0 = never)
    ref_reset_patience: int = 0              # ... or after N evaluations without a better held-out pass@1 (0 = off)
    reset_optimizer: bool = False            # a reset also clears the optimizer state (ProRL)
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 64                    # sequences per forward/backward (gradient accumulation)
    gen_batch: int = 256                     # sequences sampled at once by the engine
    eval_interval: int = 10
    n_eval: int = 200
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"


# Presets: each paper's values for the fields above. Budget-dependent values (token lengths) are scaled to
# the embedded task's 64-token budget where the paper's are in thousands; `--recipe=X --field=v` overrides.
RECIPES = {
    # DeepSeekMath GRPO: std-scaled group advantages, sequence-mean of token-means, k3 KL with beta 0.04
    "grpo": dict(loss_type="grpo", scale_rewards="group", advantage="grpo", beta=0.04, epsilon=0.2,
                 epsilon_high=0.0),
    # DAPO: clip-higher 0.2/0.28, dynamic sampling, token-level loss, soft overlong punishment
    # (L_cache 4096 of L_max 20480 = 20% of the budget -> 13 of 64 tokens), no KL
    "dapo": dict(loss_type="dapo", scale_rewards="group", epsilon=0.2, epsilon_high=0.28, dynamic_sampling=True,
                 beta=0.0, reward_funcs="correctness,overlong", soft_punish_cache=13),
    # Dr. GRPO: no std scaling, token sum over a constant (sequences x max_new_tokens), no KL
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.0, epsilon=0.2, epsilon_high=0.0),
    # ProRL (Nemotron-Research-Reasoning-Qwen-1.5B): clip 0.2/0.4, dynamic sampling, token-level loss,
    # beta 1e-4 (the value usually quoted; the v1 text does not state it), reference + optimizer reset every
    # 400 steps, temperature 1.2, response budget doubled for the last ~10% (8k -> 16k)
    "prorl": dict(loss_type="dapo", scale_rewards="group", epsilon=0.2, epsilon_high=0.4, dynamic_sampling=True,
                  beta=1e-4, ref_reset_every=400, reset_optimizer=True, temperature=1.2,
                  max_new_tokens_schedule="0.9:2x"),
    # Open-RS Exp. 3: format + cosine length reward weighted 1:2, beta 0.04, 6 generations, temperature 0.7,
    # a token mean over the batch (its TRL commit's local-batch token mean)
    "openrs": dict(loss_type="dapo", scale_rewards="group", beta=0.04, group_size=6, temperature=0.7,
                   reward_funcs="format,cosine", reward_weights="1,2"),
    # MGPO (VibeThinker): GRPO's sequence-mean of token-means, no KL, groups weighted by their pass rate's
    # distance from 0.5; lambda is not given in the papers (4.0 as in third-party code)
    "mgpo": dict(loss_type="grpo", scale_rewards="group", beta=0.0, mgpo_lambda=4.0),
}

CHOICES = {"answer_match": ("strict", "flexible"), "loss_type": ("grpo", "dapo", "dr_grpo"),
           "scale_rewards": ("group", "batch", "none"),
           "advantage": ("grpo", "rloo"), "importance_sampling_level": ("token", "sequence")}
REWARD_FUNCS = ("correctness", "format", "cosine", "overlong")


def config_from_args(argv=None):
    """GRPOConfig from the command line: the `--recipe` preset first, then every explicit flag over it."""
    cfg = parse_config(GRPOConfig(), argv)
    if cfg.recipe:
        if cfg.recipe not in RECIPES:
            raise SystemExit(f"error: unknown --recipe '{cfg.recipe}'; choose one of {', '.join(RECIPES)}")
        cfg = parse_config(apply_recipe(GRPOConfig(), cfg.recipe), argv)
    return cfg


def apply_recipe(cfg, name):
    for k, v in RECIPES[name].items():
        setattr(cfg, k, v)
    cfg.recipe = name
    return cfg


def check_config(cfg):
    for k, ok in CHOICES.items():
        if getattr(cfg, k) not in ok:
            raise SystemExit(f"error: --{k} must be one of {', '.join(ok)}, got '{getattr(cfg, k)}'")
    if cfg.group_size < 2:
        raise SystemExit("error: --group_size must be >= 2: advantages are relative to the other samples of a group")
    funcs, weights = reward_spec(cfg)
    if len(funcs) != len(weights):
        raise SystemExit(f"error: --reward_weights has {len(weights)} values for {len(funcs)} --reward_funcs")
    if "overlong" in funcs and cfg.soft_punish_cache <= 0:
        raise SystemExit("error: the overlong reward needs --soft_punish_cache > 0 (L_cache, in tokens)")
    response_budget(cfg, 0)  # parses the schedule


def reward_spec(cfg):
    funcs = [f.strip() for f in cfg.reward_funcs.split(",") if f.strip()]
    for f in funcs:
        if f not in REWARD_FUNCS:
            raise SystemExit(f"error: unknown reward '{f}' in --reward_funcs; choose from {', '.join(REWARD_FUNCS)}")
    try:
        weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * len(funcs)
    except ValueError:
        raise SystemExit(f"error: --reward_weights must be comma-separated numbers, got '{cfg.reward_weights}'")
    return funcs, weights


def accuracy_differs(cfg, kinds):
    """Whether `accuracy` (binary correctness) says something `reward` does not. Not when the reward is
    `correctness` alone at weight 1 and every row kind's verifier scores 0 or 1: then both are the same
    number, and only `reward` is logged."""
    return reward_spec(cfg) != (["correctness"], [1.0]) or not set(kinds) <= set(BINARY_KINDS)


def response_budget(cfg, it):
    """max_new_tokens at iteration `it` under `max_new_tokens_schedule` ("iter:tokens,..."; see GRPOConfig)."""
    budget = cfg.max_new_tokens
    for entry in filter(None, (e.strip() for e in cfg.max_new_tokens_schedule.split(","))):
        try:
            at, tokens = entry.split(":")
            start = round(float(at) * cfg.iterations) if "." in at else int(at)
            n = round(float(tokens[:-1]) * cfg.max_new_tokens) if tokens.endswith("x") else int(tokens)
        except ValueError:
            raise SystemExit(f"error: --max_new_tokens_schedule entry '{entry}' is not iteration:tokens "
                             f"(e.g. 100:128, 0.9:2x)")
        if it >= start:
            budget = n
    return budget


# ----------------------------------------------------------------------------------------------
# 2. Rewards. Each takes one completion; `score` weighs and sums them.

def format_reward(text):
    """1 when the completion states exactly one final answer as '#### N', else 0."""
    return float(text.count("####") == 1 and extract_answer(text) is not None)


def cosine_length_reward(correct, length, max_len, min_value_wrong=-1.0, max_value_wrong=-0.5,
                         min_value_correct=0.5, max_value_correct=1.0):
    """Open-RS's cosine-scaled correctness (Yeo et al. 2502.03373), with the shape of its source:
    a correct answer earns max_value_correct when short, min_value_correct at max_len; a wrong one
    min_value_wrong when short, max_value_wrong at max_len (thinking longer is penalised less).
    Length in tokens, progress clamped to [0, 1] (Open-RS counts characters and wraps past max_len)."""
    progress = min(max(length / max_len, 0.0), 1.0)
    c = math.cos(math.pi * progress)
    lo, hi = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    return lo + 0.5 * (hi - lo) * (1.0 + c)


def soft_overlong_punishment(length, max_len, cache):
    """DAPO Eq. 13: 0 up to max_len - cache tokens, then a linear ramp to -1 at max_len, -1 beyond."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return ((max_len - cache) - length) / cache
    return -1.0


def score(texts, lengths, examples, cfg, budget):
    """-> (reward (N,), correct (N,) in {0, 1}, {func: mean}) for N completions of `examples` (one per
    completion). `correct` is binary: correctness >= verifiers.CORRECT (a code row passes ~all its tests)."""
    funcs, weights = reward_spec(cfg)
    graded = score_examples(examples, texts, cfg.answer_match, cfg.sandbox)  # correctness: the number eval counts
    correct = [float(g >= CORRECT) for g in graded]
    total = [0.0] * len(texts)
    means = {}
    for name, w in zip(funcs, weights):
        if name == "correctness":
            vals = graded
        elif name == "format":
            vals = [format_reward(t) for t in texts]
        elif name == "cosine":
            vals = [cosine_length_reward(c, n, cfg.cosine_max_len or budget, cfg.cosine_min_value_wrong,
                                         cfg.cosine_max_value_wrong, cfg.cosine_min_value_correct,
                                         cfg.cosine_max_value_correct) for c, n in zip(correct, lengths)]
        else:  # overlong: L_max is the current response budget
            vals = [soft_overlong_punishment(n, budget, cfg.soft_punish_cache) for n in lengths]
        total = [a + w * v for a, v in zip(total, vals)]
        means[f"reward_{name}"] = sum(vals) / max(1, len(vals))
    return torch.tensor(total), torch.tensor(correct), means


# ----------------------------------------------------------------------------------------------
# 3. Advantages

def mgpo_weights(pass_rate, lam):
    """MGPO (VibeThinker §3.4): w = exp(-lam * KL(Bern(p) || Bern(0.5))), 1 at p = 0.5, 2^-lam at p in {0, 1}."""
    p = pass_rate.double()
    kl = torch.xlogy(p, 2 * p) + torch.xlogy(1 - p, 2 * (1 - p))  # 0 log 0 = 0
    return torch.exp(-lam * kl).to(pass_rate.dtype)


def group_advantages(rewards, correct=None, scale_rewards="group", advantage="grpo", mgpo_lambda=0.0, eps=1e-4):
    """rewards (P, G) -> advantages (P, G), one group of G completions per prompt.

    advantage grpo: r - group mean (DeepSeekMath); rloo: r - mean of the other G-1 = G/(G-1) (r - mean)
    (Ahmadian et al.). scale_rewards group: / (group std + eps) (GRPO; unbiased std as TRL and verl);
    batch: / (std over the batch + eps); none: unscaled (Dr. GRPO). A group whose raw rewards are all
    equal (max - min = 0) gets exactly 0, never a float-noise std's huge ratio. mgpo_lambda > 0: each
    group times mgpo_weights(p), p its pass rate from the binary `correct` (P, G)."""
    G = rewards.size(1)
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if advantage == "rloo":
        adv = adv * G / (G - 1)
    if scale_rewards == "group":
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + eps)
    constant = (rewards.max(dim=1).values - rewards.min(dim=1).values) == 0
    adv = torch.where(constant[:, None], torch.zeros_like(adv), adv)
    if mgpo_lambda > 0:
        adv = adv * mgpo_weights(correct.float().mean(dim=1), mgpo_lambda)[:, None]
    return adv


def informative_groups(correct):
    """(P, G) binary correctness -> (P,) bool: some but not all completions are correct (max != min)."""
    return correct.max(dim=1).values != correct.min(dim=1).values


# ----------------------------------------------------------------------------------------------
# 5. The loss

def grpo_loss(logp, old_logp, advantages, mask, epsilon=0.2, epsilon_high=None, ref_logp=None, beta=0.0,
              loss_type="grpo", importance_sampling_level="token", max_new_tokens=None, num_sequences=None,
              num_tokens=None):
    """The clipped surrogate (+ beta * k3 KL), negated for minimisation.

    logp, old_logp, ref_logp: (N, T) per-token log-probs of the sampled tokens under the policy being
    trained, the policy that sampled them and the reference; advantages (N,); mask (N, T), 1 on the
    completion tokens that count. Per token l = -min(rho A, clip(rho, 1-epsilon, 1+epsilon_high) A)
    + beta k3, with rho = exp(logp - old_logp) (token level) or, for importance_sampling_level=sequence
    (GSPO), rho = s_i = exp(mean_t log-ratio) in value with the gradient through each token (GSPO-token).
    Aggregation over the WHOLE optimizer batch (num_sequences, num_tokens: its counts of sequences with
    a counted token and of counted tokens, fixed before the micro-batch loop; default: this batch's):
      grpo     sum_i (sum_t l m / sum_t m) / num_sequences               (DeepSeekMath Eq. 3)
      dapo     sum_i sum_t l m / num_tokens                              (DAPO Eq. 8, over the batch)
      dr_grpo  sum_i sum_t l m / (num_sequences * max_new_tokens)        (Dr. GRPO, a constant)
    Returns (loss, stats): stats are token means of clip_low (rho < 1-eps where A < 0: the clip binds),
    clip_high (rho > 1+eps_high where A > 0) and kl."""
    eps_high = epsilon if not epsilon_high else epsilon_high
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        seq = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = seq.detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv)
    per_token = -surrogate
    kl = None
    if ref_logp is not None:
        # k3 estimator of KL(pi || ref): unbiased, always >= 0 (Schulman, "Approximating KL divergence")
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if num_sequences is None:
        num_sequences = int((mask.sum(1) > 0).sum())
    if num_tokens is None:
        num_tokens = float(mask.sum())
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(num_sequences, 1)
    elif loss_type == "dapo":
        loss = per_token.sum() / max(num_tokens, 1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (max(num_sequences, 1) * max_new_tokens)
    else:
        raise ValueError(f"unknown loss_type {loss_type}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        low = ((ratio < 1 - epsilon) & (adv < 0)).float()
        high = ((ratio > 1 + eps_high) & (adv > 0)).float()
        stats = {"clip_low": ((low * mask).sum() / n).item(), "clip_high": ((high * mask).sum() / n).item()}
        if kl is not None:
            stats["kl"] = ((kl * mask).sum() / n).item()
    return loss, stats


# ----------------------------------------------------------------------------------------------
# 6. ProRL's hard reset

def hard_reset(model, ref, optimizer, reset_optimizer):
    """The reference becomes the current policy; with reset_optimizer the optimizer state is cleared
    (AdamW re-initialises its moments and step count on the next step)."""
    if ref is not None:
        ref.load_state_dict(model.state_dict())
    if reset_optimizer:
        optimizer.state.clear()


# ----------------------------------------------------------------------------------------------
# Sampling, batching, log-probs

def sample_completions(model, tok, prompts, budget, cfg, gen):
    """-> (completions, truncated): new token ids per prompt (cut after the end-of-turn token), and whether
    each ran out of the budget without it. Consecutive copies of one prompt (a group) are sampled as n
    samples of it by the engine, which computes the prompt's prefill once for all of them."""
    runs = []  # [prompt, copies]
    for p in prompts:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    n = runs[0][1] if runs and all(c == runs[0][1] for _, c in runs) else 1
    engine = _ENGINES.get(id(model))
    if engine is None or engine.model is not model or engine.max_batch != cfg.gen_batch:
        engine = _ENGINES[id(model)] = Engine(model, max_batch=cfg.gen_batch)  # kept: its CUDA graphs are reused
    groups = engine.generate([p for p, _ in runs] if n > 1 else prompts, n=n, max_new_tokens=budget,
                             stop_tokens=stop_tokens_for(tok, "chat"), temperature=cfg.temperature, top_p=cfg.top_p,
                             generator=gen)
    samples = [s for group in groups for s in group]
    return [s.tokens for s in samples], [s.truncated for s in samples]


_ENGINES = {}


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


def policy_logprobs(model, x, y, temperature, with_entropy=False):
    """log softmax(logits / T)[y]: the policy at the temperature it samples with (TRL, verl).
    with_entropy: also (detached) the entropy -sum_v p_v log p_v of p = softmax(logits / T) at every
    position, from the same forward (TRL's entropy at the sampling temperature). -> logp or (logp, entropy)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # torchrun: through DDP's forward (LogprobsModule)
        return model(x, y, temperature, with_entropy)
    h = model.hidden_states(x)
    if temperature > 0 and temperature != 1.0:
        h = h / temperature  # (h / T) @ W.T = logits / T
    h, w = h.flatten(0, 1), model.lm_head_weight
    if not with_entropy:
        return output_logprobs(h, w, y.flatten(), model.cfg.kernels).view(y.shape)
    if model.cfg.kernels == "triton":  # the fused kernel never forms the logits: one more head matmul, no grad
        logp = output_logprobs(h, w, y.flatten(), model.cfg.kernels)
        with torch.no_grad():
            ent = torch.cat([token_entropy(torch.nn.functional.linear(c, w).float().log_softmax(-1))
                             for c in h.detach().split(4096)])
    else:  # the logits of the log-prob itself (= model.output_logprobs' torch path, with log_softmax kept)
        logsm = torch.nn.functional.linear(h, w).float().log_softmax(-1)
        logp = logsm.gather(1, y.flatten()[:, None]).squeeze(1)
        with torch.no_grad():
            ent = token_entropy(logsm)
    return logp.view(y.shape), ent.view(y.shape)


def token_entropy(logsm):
    """-sum_v p_v log p_v over the last dimension, from log-probabilities log p."""
    return -(logsm.exp() * logsm).sum(-1)


class LogprobsModule(torch.nn.Module):
    """policy_logprobs as a module's forward, for DistributedDataParallel to wrap: DDP syncs the gradients of
    what runs inside its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, temperature, with_entropy=False):
        return policy_logprobs(self.model, x, y, temperature, with_entropy)


def sequence_logprobs(model, x, y, micro_batch, device, temperature=1.0):
    out = []
    for i in range(0, len(x), micro_batch):
        with autocast(device):
            out.append(policy_logprobs(model, x[i:i + micro_batch], y[i:i + micro_batch], temperature).float())
    return torch.cat(out)


def share_counts(shares, n):
    """Largest-remainder apportionment: integer counts summing to n, each within 1 of n * share
    (ties: the earlier pool)."""
    exact = [n * r for r in shares]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(shares)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:n - sum(counts)]:
        counts[k] += 1
    return counts


def draw_prompts(pools, n, rng, taken):
    """n rows drawn without replacement (avoiding (pool, index) pairs in `taken`, added to it) from pools
    [(rows, share)], each pool giving its largest-remainder share of n (`mix`: one pool per kind;
    Open-RS easy/hard mixing: one per file; one pool = a plain draw). A pool with too few free rows
    left (late dynamic-sampling rounds) leaves the rest to the other pools."""
    out = []
    short = 0
    for k, ((rows, _), want) in enumerate(zip(pools, share_counts([r for _, r in pools], n))):
        free = [i for i in range(len(rows)) if (k, i) not in taken]
        for i in rng.sample(free, min(want, len(free))):
            taken.add((k, i))
            out.append(rows[i])
        short += max(0, want - len(free))
    for k, (rows, _) in enumerate(pools):
        if short <= 0:
            break
        free = [i for i in range(len(rows)) if (k, i) not in taken]
        for i in rng.sample(free, min(short, len(free))):
            taken.add((k, i))
            out.append(rows[i])
            short -= 1
    return out


def parse_mix(spec, examples):
    """--mix "kind:share,..." -> {kind: share}, shares normalised to sum 1 (ProRL mixes task kinds by
    share). Unknown kind, a kind the data has no rows of, a share that is not a number >= 0, a kind named
    twice, or all shares 0: one line (SystemExit). Kinds of the data left out of the spec are not drawn."""
    have = collections.Counter(kind_of(ex) for ex in examples)
    usage = "expected kind:share,... (e.g. --mix=gsm8k:0.7,code_output:0.3)"
    mix = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, share = (x.strip() for x in part.partition(":"))
        try:
            value = float(share)
        except ValueError:
            value = None
        if not sep or value is None or not math.isfinite(value) or value < 0:
            raise SystemExit(f"error: --mix entry '{part}': {usage}; shares are numbers >= 0")
        if kind not in KINDS:
            raise SystemExit(f"error: --mix names unknown kind '{kind}'; kinds are {', '.join(KINDS)}")
        if kind not in have:
            raise SystemExit(f"error: --mix names kind '{kind}' but the data has no rows of it (kinds there: "
                             + ", ".join(f"{k} {n}" for k, n in sorted(have.items())) + ")")
        if kind in mix:
            raise SystemExit(f"error: --mix names kind '{kind}' twice")
        mix[kind] = value
    total = sum(mix.values())
    if total <= 0:
        raise SystemExit(f"error: --mix='{spec}': {usage}; the shares must not all be 0")
    return {k: v / total for k, v in mix.items()}


def kind_pools(rows, mix):
    """[(rows of one kind, share)] for the kinds of `mix` ({kind: share}, parse_mix) with share > 0."""
    return [([r for r in rows if kind_of(r) == k], v) for k, v in mix.items() if v > 0]


def per_kind_stats(kinds, rewards, correct, lengths):
    """{reward/<kind>, accuracy/<kind>, response_len/<kind>}: means over the completions of each kind
    (accuracy = binary correctness, as `accuracy`)."""
    out = {}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        out[f"reward/{kind}"] = sum(rewards[i] for i in idx) / len(idx)
        out[f"accuracy/{kind}"] = sum(correct[i] for i in idx) / len(idx)
        out[f"response_len/{kind}"] = sum(lengths[i] for i in idx) / len(idx)
    return out


def rollout(model, tok, pools, cfg, it, budget, device):
    """1-2: sample groups and score them. With dynamic sampling, groups whose correctness is all equal are
    dropped and more prompts drawn until `prompts_per_iter` informative groups are in or
    `max_sampling_rounds` rounds are spent (then the batch is what was found; verl raises instead).
    Returns the batch (prompts, completions, truncated, rewards (P, G), correct (P, G)) and stats."""
    rank, world = ranks()  # under torchrun each rank samples whole groups for its share of the prompts
    rng = random.Random(cfg.seed * 100003 + it)  # a fresh, seeded draw per iteration: --resume needs no sampler state
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100003 + it + RANK_SEED * rank)
    G, want = cfg.group_size, cfg.prompts_per_iter // world
    taken = set()
    keep = {"prompts": [], "completions": [], "truncated": [], "rewards": [], "correct": [], "texts": [],
            "kinds": []}
    sampled = all_equal = rounds = sampled_tokens = 0
    reward_means = {}
    while rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        need = want - len(keep["rewards"]) if cfg.dynamic_sampling else want
        if world > 1:  # ranks draw in lockstep (the same rows, enough for the rank lacking most), each keeps its slice
            need = ranks_reduce(need, "max")
            if need <= 0:
                break
        rows = draw_prompts(pools, need * world, rng, taken)
        if not rows:
            break
        rows = rows[rank * need:(rank + 1) * need]  # this rank's share (all of them without torchrun)
        rounds += 1
        if not rows:
            continue
        prompts = [p for p in (example_prompt_ids(tok, r, "chat") for r in rows) for _ in range(G)]  # render once
        completions, truncated = sample_completions(model, tok, prompts, budget, cfg, gen)
        texts = [tok.decode(c) for c in completions]
        expanded = [r for r in rows for _ in range(G)]
        rewards, correct, means = score(texts, [len(c) for c in completions], expanded, cfg, budget)
        rewards, correct = rewards.view(-1, G), correct.view(-1, G)
        useful = informative_groups(correct)
        sampled += len(rows)
        sampled_tokens += sum(len(c) for c in completions)
        all_equal += int((~useful).sum())
        for k, v in means.items():
            reward_means[k] = reward_means.get(k, 0.0) + v * len(rows)
        for g in range(len(rows)):
            if (cfg.dynamic_sampling and not useful[g]) or len(keep["rewards"]) >= want:
                continue
            sl = slice(g * G, (g + 1) * G)
            keep["prompts"] += prompts[sl]
            keep["completions"] += completions[sl]
            keep["truncated"] += truncated[sl]
            keep["texts"] += texts[sl]
            keep["kinds"] += [kind_of(rows[g])] * G
            keep["rewards"].append(rewards[g])
            keep["correct"].append(correct[g])
        if len(keep["rewards"]) >= want and world == 1:
            break
    stats = {"frac_all_equal": all_equal / max(1, sampled), "groups_sampled": sampled,
             "sampled_len": sampled_tokens / max(1, sampled * G),
             **{k: v / max(1, sampled) for k, v in reward_means.items()}}
    if cfg.dynamic_sampling:
        stats.update(ds_rounds=rounds, ds_dropped=all_equal / max(1, sampled), ds_groups=len(keep["rewards"]))
    if keep["rewards"]:
        keep["rewards"] = torch.stack(keep["rewards"])
        keep["correct"] = torch.stack(keep["correct"])
    return keep, stats


def difficulty_prefilter(model, tok, rows, cfg, device, label):
    """VibeThinker-3B's pre-filter: the starting policy's pass rate on each prompt from `prefilter_samples`
    samples; prompts at 0 or 1 are dropped. -> (kept indices, pass rates)."""
    idx = list(range(len(rows)))
    if cfg.prefilter_pool and cfg.prefilter_pool < len(rows):
        idx = sorted(random.Random(cfg.seed).sample(idx, cfg.prefilter_pool))
    k = cfg.prefilter_samples
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    rates = []
    for i in progress(range(0, len(idx), 32), desc=f"pre-filter {label}", leave=False):
        chunk = [rows[j] for j in idx[i:i + 32]]
        prompts = [p for p in (example_prompt_ids(tok, r, "chat") for r in chunk) for _ in range(k)]
        completions, _ = sample_completions(model, tok, prompts, cfg.max_new_tokens, cfg, gen)
        graded = score_examples([r for r in chunk for _ in range(k)], [tok.decode(c) for c in completions],
                                cfg.answer_match, cfg.sandbox)
        ok = [float(g >= CORRECT) for g in graded]
        rates += [sum(ok[j * k:(j + 1) * k]) / k for j in range(len(chunk))]
    kept = [j for j, p in zip(idx, rates) if 0 < p < 1]
    return kept, {str(j): p for j, p in zip(idx, rates)}


def train_on_batch(model, ref, optimizer, batch, cfg, budget, device, it):
    """Steps 3-5 on one rollout batch: advantages, log-probs, `num_iterations` optimizer steps. -> stats."""
    rewards, correct = batch["rewards"], batch["correct"]
    # 3. advantages
    advantages = rank_advantages(rewards, correct, cfg).flatten().to(device)
    # 4. log-probs of the sampled tokens under the sampling policy (and the reference)
    x, y, mask = rollout_batch(None, batch["prompts"], batch["completions"], device)
    completion_mask, n_completion = mask, float(mask.sum())  # the entropy is over every sampled token
    if cfg.mask_truncated_completions:  # DAPO overlong filtering
        mask = mask * (~torch.tensor(batch["truncated"], device=device))[:, None].float()
    with torch.no_grad():
        old_logp = sequence_logprobs(model, x, y, cfg.micro_batch, device, cfg.temperature)
        ref_logp = sequence_logprobs(ref, x, y, cfg.micro_batch, device, cfg.temperature) if ref is not None else None
    # 5. policy update: the normaliser of the whole batch fixed before the micro-batch loop
    n = len(x)
    num_sequences, num_tokens = int((mask.sum(1) > 0).sum()), float(mask.sum())
    world = ranks()[1]  # torchrun: the normaliser is the whole global batch's, over every rank
    all_sequences, all_tokens = ranks_reduce(num_sequences), ranks_reduce(num_tokens)
    stats_sum = {}
    entropy = 0.0
    for epoch in range(cfg.num_iterations):
        for i in range(0, n, cfg.micro_batch):
            sl = slice(i, i + cfg.micro_batch)
            if world > 1:  # DDP: all-reduce the gradients in the backward of this rank's last micro-step only
                model.require_backward_grad_sync = i + cfg.micro_batch >= n
            with autocast(device):
                if epoch == 0:  # the policy that sampled the batch: its entropy from this forward's logits
                    logp, ent = policy_logprobs(model, x[sl], y[sl], cfg.temperature, with_entropy=True)
                    entropy += float((ent.float() * completion_mask[sl]).sum())
                else:
                    logp = policy_logprobs(model, x[sl], y[sl], cfg.temperature)
                logp = logp.float()
            loss, stats = grpo_loss(logp, old_logp[sl], advantages[sl], mask[sl], cfg.epsilon, cfg.epsilon_high,
                                    None if ref_logp is None else ref_logp[sl], cfg.beta, cfg.loss_type,
                                    cfg.importance_sampling_level, budget, all_sequences, all_tokens)
            check_finite(loss, "the loss", it, cfg.out_dir)
            (loss * world).backward()  # DDP averages the ranks' gradients: x world makes that their sum
            share = float(mask[sl].sum()) / max(num_tokens, 1) / cfg.num_iterations
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v * share
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        check_finite(gnorm, "the gradient norm", it, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    entropy = ranks_reduce(entropy) / max(ranks_reduce(n_completion), 1)  # token mean over the global batch
    lengths = [len(c) for c in batch["completions"]]
    # accuracy: binary correctness (>= verifiers.CORRECT), distinct from the shaped `reward`
    row = dict(reward=rewards.mean().item(), accuracy=correct.float().mean().item(), grad_norm=gnorm.item(),
               entropy=entropy,
               response_len=sum(lengths) / len(lengths), truncated=sum(batch["truncated"]) / len(lengths),
               max_new_tokens=budget, adv_abs=advantages.abs().mean().item(), **stats_sum)
    if cfg.mgpo_lambda > 0:
        row["mgpo_weight"] = mgpo_weights(correct.float().mean(1), cfg.mgpo_lambda).mean().item()
    return row


def load_pools(cfg):
    """[(rows, share)]: `data` alone, `data` split by row kind with the shares of `mix`, or the files and
    shares of `difficulty_mix`."""
    if cfg.mix and cfg.difficulty_mix:
        raise SystemExit("error: --mix (shares of row kinds) and --difficulty_mix (shares of files) cannot be "
                         "combined; give one")
    if not cfg.difficulty_mix:
        rows = load_examples(cfg.data, "target", "GRPO training", min_rows=cfg.prompts_per_iter,
                             min_flag="--prompts_per_iter")
        if not cfg.mix:
            return [(rows, 1.0)]
        mix = parse_mix(cfg.mix, rows)
        left_out = sorted({r["kind"] for r in rows} - {k for k, v in mix.items() if v > 0})
        log(f"grpo: --mix {', '.join(f'{k} {v:.2f}' for k, v in mix.items())}"
            + (f"; rows of {', '.join(left_out)} are not drawn" if left_out else ""))
        return kind_pools(rows, mix)
    pools = []
    for entry in cfg.difficulty_mix.split(","):
        path, _, ratio = entry.rpartition(":")
        try:
            pools.append((load_examples(path, "target", "GRPO training"), float(ratio)))
        except ValueError:
            raise SystemExit(f"error: --difficulty_mix entry '{entry}' is not path:ratio")
    total = sum(r for _, r in pools)
    return [(rows, r / total) for rows, r in pools]


def fit_to_context(tok, max_seq_len, pools, problems, cfg):
    """Up front, before any sampling: training prompts and held-out problems that cannot fit in the
    context with the largest response budget of the run are skipped and counted (eval.fit_prompts), and a
    warning is printed when most reference answers are longer than max_new_tokens (eval.check_budget)."""
    budget = max([cfg.max_new_tokens] + [response_budget(cfg, it) for it in range(cfg.iterations)])
    fitted, labels = [], []
    for k, (rows, share) in enumerate(pools):
        labels.append(f"kind {rows[0]['kind']}" if cfg.mix else f"pool {k}" if len(pools) > 1 else "")
        label = "GRPO training prompts" + (f" ({labels[-1]})" if labels[-1] else "")
        fitted.append((fit_prompts(tok, rows, "chat", max_seq_len, budget, label), share))
        check_budget(tok, fitted[-1][0], budget, label)
    n = sum(len(rows) for rows, _ in fitted)
    if n < cfg.prompts_per_iter:
        raise SystemExit(f"error: {n} training prompts fit in the context of {max_seq_len} tokens with "
                         f"max_new_tokens {budget}, fewer than --prompts_per_iter={cfg.prompts_per_iter}; lower "
                         f"--max_new_tokens or --prompts_per_iter, or use shorter prompts")
    if cfg.mix:
        for (rows, _), label, want in zip(fitted, labels, share_counts([r for _, r in fitted], cfg.prompts_per_iter)):
            if len(rows) < want:
                raise SystemExit(f"error: --mix gives {label} {want} of {cfg.prompts_per_iter} prompts "
                                 f"per iteration but the data has {len(rows)} usable rows of it; add rows or "
                                 f"lower its share")
    if problems:
        problems = fit_prompts(tok, problems, "chat", max_seq_len, cfg.max_new_tokens, "held-out problems")
        check_budget(tok, problems, cfg.max_new_tokens, "held-out")
    return fitted, problems


# ----------------------------------------------------------------------------------------------
# torchrun (data parallel): whole groups per rank, so advantages stay local; these are no-ops without it

NO_METRICS = type("NoMetrics", (), {"write": lambda self, **row: None})()  # ranks other than 0 write none
RANK_SEED = 1_000_000_007  # rank r samples with the seed of rank 0 plus r times this


def ranks_gather(lists):
    """Each of `lists` concatenated over the ranks in rank order (exact per-kind statistics under torchrun);
    the lists themselves without torchrun."""
    if ranks()[1] == 1:
        return lists
    parts = ranks_gather_object(lists)
    return [sum((p[i] for p in parts), []) for i in range(len(lists))]


def ranks_mean(row, weight, summed=("groups_sampled", "ds_groups")):
    """Metrics of every rank as one row: the mean weighted by each rank's `weight` (its groups or sequences;
    token-weighted stats such as clip fractions and KL are thus weighted by sequences across ranks), counts
    summed. The row itself without torchrun."""
    if ranks()[1] == 1:
        return row
    parts = ranks_gather_object((row, weight))
    out = {}
    for k, v in row.items():
        have = [(r[k], w) for r, w in parts if k in r]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            out[k] = v
        elif k in summed:
            out[k] = sum(x for x, _ in have)
        elif all(x == v for x, _ in have):  # the same on every rank (e.g. max_new_tokens): kept as it is
            out[k] = v
        else:
            total = sum(w for _, w in have)
            out[k] = sum(x * w for x, w in have) / total if total else sum(x for x, _ in have) / len(have)
    return out


def rank_advantages(rewards, correct, cfg):
    """group_advantages of this rank's groups. They are local (whole groups per rank), except scale_rewards=batch
    under torchrun: the std of every rank's rewards, as one process would take it."""
    rank, world = ranks()
    if world == 1 or cfg.scale_rewards != "batch":
        return group_advantages(rewards, correct, cfg.scale_rewards, cfg.advantage, cfg.mgpo_lambda, cfg.adv_eps)
    parts = ranks_gather_object((rewards.cpu(), correct.cpu()))
    start = sum(len(r) for r, _ in parts[:rank])
    adv = group_advantages(torch.cat([r for r, _ in parts]), torch.cat([c for _, c in parts]), cfg.scale_rewards,
                           cfg.advantage, cfg.mgpo_lambda, cfg.adv_eps)
    return adv[start:start + len(rewards)]


def main(cfg):
    run = start_run(cfg, "grpo")  # lock, no accidental overwrite, saved settings on --resume, SIGTERM/SIGINT
    check_config(cfg)
    set_threads()
    # under torchrun: each rank samples and trains on its share of the prompts (DDP); rank 0 logs and saves
    rank, world, device = init_distributed(cfg.device)
    say = log if rank == 0 else (lambda msg: None)  # under torchrun, rank 0 speaks for all
    note = tqdm.write if rank == 0 else (lambda msg: None)  # (beside the progress bar)
    if cfg.prompts_per_iter % world:
        raise SystemExit(f"error: --prompts_per_iter={cfg.prompts_per_iter} must be a multiple of the {world} ranks "
                         f"(whole groups stay on one rank)")
    kernels = pick_kernels(cfg.kernels, device)
    seed_everything(cfg.seed)
    # every input is read and validated (all rows, tasks.load_examples) before any checkpoint is loaded
    pools = load_pools(cfg)
    problems = load_examples(cfg.heldout, "target", "held-out", limit=cfg.n_eval) if cfg.n_eval > 0 else []
    src = run.ckpt if cfg.resume else cfg.init_from
    model, tok, meta, ckpt = load_checkpoint(src, device, expect_stage=["sft", "grpo", "import"], kernels=kernels)
    # the reference: the policy GRPO started from, or the last hard reset's snapshot; kept across resumes
    ref_from = meta.get("ref_from", src) if cfg.resume else src
    resets = meta.get("resets", []) if cfg.resume else []
    best = meta.get("best_pass1", None) if cfg.resume else None
    stale = meta.get("evals_since_best", 0) if cfg.resume else 0
    ref = None
    if cfg.beta > 0 or cfg.log_kl:
        ref, _, _, _ = load_checkpoint(ref_from, device, kernels=kernels)
        ref.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        start = load_training_state(ckpt, optimizer)["step"]
        say(f"resuming from {ckpt} at iteration {start}")
    metrics = Metrics(cfg.out_dir, resume_step=start if cfg.resume else None) if rank == 0 else NO_METRICS
    train_model = model
    if world > 1:  # gradients averaged across ranks in the backward (see train_on_batch); sampling uses the bare model
        train_model = torch.nn.parallel.DistributedDataParallel(LogprobsModule(model), broadcast_buffers=False)
    say("grpo config: " + json.dumps(asdict(cfg)))
    pools, problems = fit_to_context(tok, model.cfg.max_seq_len, pools, problems, cfg)
    kinds = {r["kind"] for rows, _ in pools for r in rows}
    several_kinds = len(kinds) > 1
    log_accuracy = accuracy_differs(cfg, kinds)

    if cfg.prefilter_samples > 0:  # measured once on the starting policy, kept across resumes
        path = os.path.join(cfg.out_dir, "prefilter.json")
        if cfg.resume and os.path.exists(path):
            kept = json.load(open(path))["kept"]
        else:
            kept, rates = [], []
            for k, (rows, _) in enumerate(pools):
                kk, rr = difficulty_prefilter(model, tok, rows, cfg, device, f"pool {k}")
                kept.append(kk)
                rates.append(rr)
            if world > 1:  # every rank measured the same; rank 0's verdict is the one written and used
                torch.distributed.broadcast_object_list(kept, src=0)
            if rank == 0:
                atomic_write(path, {"kept": kept, "pass_rates": rates})
            for k, rr in enumerate(rates):
                vals = list(rr.values())
                say(f"pre-filter pool {k}: {len(vals)} prompts measured, pass rate 0: "
                    f"{sum(v == 0 for v in vals)}, 1: {sum(v == 1 for v in vals)}, kept {len(kept[k])}")
                metrics.write(step=0, prefilter_measured=len(vals), prefilter_zero=sum(v == 0 for v in vals),
                              prefilter_one=sum(v == 1 for v in vals), prefilter_kept=len(kept[k]))
        pools = [([rows[i] for i in kk], r) for (rows, r), kk in zip(pools, kept)]
        if sum(len(rows) for rows, _ in pools) < cfg.prompts_per_iter:
            raise SystemExit(f"error: the difficulty pre-filter kept {sum(len(r) for r, _ in pools)} prompts, fewer "
                             f"than --prompts_per_iter={cfg.prompts_per_iter}; the starting policy solves "
                             f"(almost) none or all of them. Raise --prefilter_samples or use other data.")
    say(f"grpo: {sum(len(r) for r, _ in pools)} prompts, {cfg.iterations} iterations x {cfg.prompts_per_iter} "
        f"prompts x {cfg.group_size} samples, device {device}, kernels {kernels}, from {src}")

    def evaluate(it):
        if problems:
            acc = heldout_accuracy(model, tok, problems, "chat", k=0, max_new_tokens=cfg.max_new_tokens, rank=rank,
                                   world=world, sandbox=cfg.sandbox)
            per_kind = {f"heldout_pass1/{k.split('/', 1)[1]}": v for k, v in acc.items() if k.startswith("pass@1/")}
            metrics.write(step=it, heldout_pass1=acc["pass@1"], heldout_truncated=acc["truncated"], **per_kind)
            note(f"iter {it}: held-out pass@1 {acc['pass@1']:.1f}%"
                       + "".join(f", {k.split('/', 1)[1]} {v:.1f}%" for k, v in per_kind.items()))
            return acc["pass@1"]

    def reset(it, why):
        nonlocal ref_from
        hard_reset(model, ref, optimizer, cfg.reset_optimizer)
        if ref is not None:  # the new reference survives --resume: its own checkpoint directory
            ref_dir = os.path.join(cfg.out_dir, f"ref_it{it}")
            if rank == 0:
                save_checkpoint(ref_dir, stage="grpo", step=it, model=model, tok=tok, train_cfg=cfg,
                                extra={"fmt": "chat"})
            ref_from = ref_dir
        resets.append(it)
        metrics.write(step=it, reset=why, reset_optimizer=cfg.reset_optimizer)
        note(f"iter {it}: hard reset of the reference{' and the optimizer' if cfg.reset_optimizer else ''} "
                   f"({why})")

    def save(it):
        if rank != 0:
            return
        save_checkpoint(cfg.out_dir, stage="grpo", step=it, model=model, tok=tok, train_cfg=cfg,
                        optimizer=optimizer, extra={"fmt": "chat", "ref_from": ref_from, "resets": resets,
                                                    "best_pass1": best, "evals_since_best": stale})

    warned_truncation = False
    if start == 0:
        best = evaluate(0)
    bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="grpo", disable=rank != 0)
    for it in run.loop(bar, save):
        t0 = time.time()
        budget = response_budget(cfg, it)
        # 1-2. sample groups (dynamic sampling: informative ones only) and score them
        batch, row = rollout(model, tok, pools, cfg, it, budget, device)
        row = ranks_mean(row, row["groups_sampled"])
        # dynamic sampling found no informative group (under torchrun: on some rank; the ranks step in
        # lockstep, so that rank's empty share skips the update everywhere, the others' groups included)
        if ranks_reduce(len(batch["rewards"]), "min") == 0:
            metrics.write(step=it + 1, skipped=1, seconds=time.time() - t0, **row)
            note(f"iter {it}: no informative group in {row.get('ds_rounds', 1)} rounds"
                 + (" on at least one rank" if ranks()[1] > 1 else "") + "; no update")
        else:
            row.update(ranks_mean(train_on_batch(train_model, ref, optimizer, batch, cfg, budget, device, it),
                                  len(batch["completions"])))
            if several_kinds:
                row.update(per_kind_stats(*ranks_gather([batch["kinds"], batch["rewards"].flatten().tolist(),
                                                         batch["correct"].flatten().tolist(),
                                                         [len(c) for c in batch["completions"]]])))
            if not log_accuracy:  # the same number as the reward: logged once
                row = {k: v for k, v in row.items() if k.split("/")[0] != "accuracy"}
            check_model(model, it + 1, cfg.out_dir)  # a blown-up policy stops here, not in the next sampling
            metrics.write(step=it + 1, seconds=time.time() - t0, **row)
            if not warned_truncation and row["truncated"] > TRUNCATION_WARN:  # once a run: the rate is logged
                warn_truncation(row["truncated"], f"iteration {it + 1}'s GRPO training", budget)
                warned_truncation = True
            bar.set_postfix(acc=f"{row.get('accuracy', row['reward']):.3f}", len=f"{row['response_len']:.0f}",
                            eq=f"{row['frac_all_equal']:.2f}")
        done = it + 1
        if cfg.ref_reset_every and done % cfg.ref_reset_every == 0 and done < cfg.iterations:
            reset(done, f"every {cfg.ref_reset_every} iterations")
        if done % cfg.eval_interval == 0 or done == cfg.iterations:
            pass1 = evaluate(done)
            if pass1 is not None and cfg.ref_reset_patience:
                if best is None or pass1 > best:
                    best, stale = pass1, 0
                else:
                    stale += 1
                    if stale >= cfg.ref_reset_patience and done < cfg.iterations:
                        reset(done, f"held-out pass@1 not above {best:.1f}% for {stale} evaluations")
                        stale = 0
            save(done)
    bar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    run.close()
    say(f"grpo done: checkpoint in {os.path.join(cfg.out_dir, 'ckpt')}")


if __name__ == "__main__":
    main(config_from_args())
