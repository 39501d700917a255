"""GRPO's options against hand computations on tiny tensors (point 11 of the RL-recipes issue)."""
import dataclasses
import math
import os

import pytest
import torch

import grpo
from demo_fixture import tiny_data  # noqa: F401  (session fixture)
from grpo import (config_from_args, cosine_length_reward, group_advantages, grpo_loss, hard_reset, mgpo_weights,
                  response_budget, rollout_batch, soft_overlong_punishment)


# ---------------------------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std of (1, 0, 0)
    expected = [[(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std]]
    torch.testing.assert_close(adv[:1], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # a group whose rewards are all equal carries no signal: exactly 0, even with eps = 0 (no 0/0)
    assert torch.equal(adv[1], torch.zeros(3))


def test_constant_group_is_zero_despite_float_noise_in_std():
    r = torch.full((1, 8), 0.1)  # 0.1 is not exact in binary; the std of a constant row must not matter
    assert torch.equal(group_advantages(r, eps=1e-12), torch.zeros(1, 8))


def test_scale_rewards_batch_and_none_and_rloo_by_hand():
    torch.manual_seed(0)
    r = torch.rand(3, 4)
    centred = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(group_advantages(r, scale_rewards="none"), centred)
    torch.testing.assert_close(group_advantages(r, scale_rewards="batch", eps=0.0), centred / r.flatten().std())
    # RLOO: each reward minus the mean of the OTHER G-1 rewards of its group, by a loop
    loo = torch.tensor([[r[p, i].item() - (r[p].sum().item() - r[p, i].item()) / 3 for i in range(4)]
                        for p in range(3)])
    torch.testing.assert_close(group_advantages(r, scale_rewards="none", advantage="rloo"), loo)


@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_mgpo_weights_at_one_two_four_eighths(lam):
    def hand(p):  # KL(Bern(p) || Bern(0.5)) by hand
        kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
        return math.exp(-lam * kl)

    p = torch.tensor([1 / 8, 2 / 8, 4 / 8])
    w = mgpo_weights(p, lam)
    torch.testing.assert_close(w, torch.tensor([hand(1 / 8), hand(2 / 8), 1.0]), rtol=1e-6, atol=1e-6)
    # the spec sheet's table (rounded): lambda 1: 0.73, 0.88, 1; lambda 4: 0.28, 0.59, 1
    table = {1.0: [0.73, 0.88, 1.0], 4.0: [0.28, 0.59, 1.0]}[lam]
    assert all(abs(a - b) < 0.006 for a, b in zip(w.tolist(), table))
    # symmetric about 0.5; at p = 0 or 1 the weight is 2^-lambda (0 log 0 = 0, no NaN)
    torch.testing.assert_close(mgpo_weights(1 - p, lam), w)
    torch.testing.assert_close(mgpo_weights(torch.tensor([0.0, 1.0]), lam), torch.full((2,), 2 ** -lam))


def test_mgpo_reads_binary_correctness_not_the_shaped_reward():
    correct = torch.tensor([[1.0] + [0.0] * 7, [1.0, 1.0] + [0.0] * 6])
    shaped = correct + 0.01 * torch.arange(8.0)  # a length bonus: nothing is all-equal, pass rates stay 1/8, 2/8
    plain = group_advantages(shaped, correct)
    weighted = group_advantages(shaped, correct, mgpo_lambda=2.0)
    w = torch.tensor([math.exp(-2 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))) for p in (1 / 8, 2 / 8)])
    torch.testing.assert_close(weighted, plain * w[:, None], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the loss

def make_case():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0, -0.1], [-0.3, -0.9, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    return logp, old, mask, adv


def test_grpo_loss_by_hand():
    logp, old, mask, adv = make_case()
    loss, stats = grpo_loss(logp, old, adv, mask, epsilon=0.2)
    # sequence 1 (A = 2): ratios e^0.2 (clipped to 1.2) and 1; token 3 is masked
    seq1 = -(min(math.exp(0.2) * 2, 1.2 * 2) + 2.0) / 2
    # sequence 2 (A = -1): ratios 1, e^0.7, 1; for A < 0 the min keeps the unclipped -e^0.7
    seq2 = (1.0 + math.exp(0.7) + 1.0) / 3
    assert abs(loss.item() - (seq1 + seq2) / 2) < 1e-6
    # the clip binds on one token (ratio e^0.2 > 1.2 with A > 0); e^0.7 with A < 0 is not clipped
    assert abs(stats["clip_high"] - 1 / 5) < 1e-6 and stats["clip_low"] == 0
    loss.backward()
    g = logp.grad
    assert g[0, 0] == 0  # clipped with A > 0: no push further
    assert abs(g[0, 1].item() - (-2.0 / 2 / 2)) < 1e-6  # -A / len / n_seq: raises log-prob of a good token
    assert g[0, 2] == 0  # masked
    assert abs(g[1, 1].item() - math.exp(0.7) / 3 / 2) < 1e-5  # unclipped for A < 0: ratio * |A| / len / n


def test_decoupled_clip_higher_and_low_side_by_hand():
    logp = torch.log(torch.tensor([[1.25, 1.35, 0.7, 0.9]]))  # ratios vs old log-prob 0
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    up, st_up = grpo_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
    # A > 0: min(r, clip(r, 0.8, 1.28)) -> 1.25, 1.28, 0.7, 0.9
    assert abs(up.item() + (1.25 + 1.28 + 0.7 + 0.9) / 4) < 1e-6 and abs(st_up["clip_high"] - 0.25) < 1e-6
    sym, _ = grpo_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2, loss_type="dapo")
    assert abs(sym.item() + (1.2 + 1.2 + 0.7 + 0.9) / 4) < 1e-6
    down, st_down = grpo_loss(logp, old, torch.tensor([-1.0]), mask, epsilon=0.2, epsilon_high=0.28,
                              loss_type="dapo")
    # A < 0: min(-r, -clip(r)) = -max(r, clip(r)) -> -1.25, -1.35, -0.8, -0.9: the low side binds at 0.7
    assert abs(down.item() - (1.25 + 1.35 + 0.8 + 0.9) / 4) < 1e-6 and abs(st_down["clip_low"] - 0.25) < 1e-6


def test_loss_types_by_hand():
    logp, old, mask, adv = make_case()
    tok = []  # each counted token's -min(...) term
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                r = math.exp(logp[b, t].item() - old[b, t].item())
                a = adv[b].item()
                tok.append((b, -min(r * a, min(max(r, 0.8), 1.2) * a)))
    dapo, _ = grpo_loss(logp, old, adv, mask, loss_type="dapo")
    assert abs(dapo.item() - sum(v for _, v in tok) / 5) < 1e-6
    dr, _ = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_new_tokens=10)
    assert abs(dr.item() - sum(v for _, v in tok) / (2 * 10)) < 1e-6


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_equals_one_big_batch(loss_type):
    torch.manual_seed(1)
    N, T = 6, 5
    logp = torch.randn(N, T) * 0.3 - 1
    old = logp + torch.randn(N, T) * 0.2
    mask = (torch.rand(N, T) > 0.3).float()
    mask[2] = 0  # a fully masked (truncated) completion
    adv = torch.randn(N)
    big = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(big, old, adv, mask, loss_type=loss_type, max_new_tokens=T)
    loss.backward()
    # micro-batches of 2 with the whole batch's counts fixed before the loop
    acc = logp.clone().requires_grad_(True)
    n_seq, n_tok = int((mask.sum(1) > 0).sum()), float(mask.sum())
    total = 0.0
    for i in range(0, N, 2):
        part, _ = grpo_loss(acc[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], loss_type=loss_type,
                            max_new_tokens=T, num_sequences=n_seq, num_tokens=n_tok)
        part.backward()
        total += part.item()
    assert abs(total - loss.item()) < 1e-6
    torch.testing.assert_close(acc.grad, big.grad, rtol=1e-6, atol=1e-7)
    if loss_type == "dapo":  # and it is NOT what a per-micro-batch token mean gives (the mismatch fixed here)
        naive = sum(grpo_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], loss_type="dapo")[0].item()
                    for i in range(0, N, 2)) / 3
        assert abs(naive - loss.item()) > 1e-4


def test_sequence_level_ratio_gspo_by_hand():
    logp, old, mask, adv = make_case()
    loss, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2, importance_sampling_level="sequence")
    s1 = math.exp((0.2 + 0.0) / 2)  # mean log-ratio over sequence 1's two counted tokens
    s2 = math.exp((0.0 + 0.7 + 0.0) / 3)
    l1 = -min(s1 * 2, min(s1, 1.2) * 2)
    l2 = -min(s2 * -1, min(s2, 1.2) * -1)
    assert abs(loss.item() - (l1 + l2) / 2) < 1e-6  # every token of a sequence carries s_i
    loss.backward()
    # s1 = e^0.1 is inside the clip: d(-s1 A)/d logp_t = -s1 A / len, then / 2 sequences
    assert abs(logp.grad[0, 0].item() - (-s1 * 2 / 2 / 2)) < 1e-6
    assert abs(logp.grad[1, 0].item() - (s2 / 3 / 2)) < 1e-6


def test_grpo_loss_k3_kl_by_hand():
    logp, old, mask, adv = make_case()
    ref = torch.tensor([[-1.1, -1.0, -0.5], [-0.3, -0.2, -1.0]])
    base, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2)
    loss, stats = grpo_loss(logp, old, adv, mask, epsilon=0.2, ref_logp=ref, beta=0.1)

    def k3(r, p):
        return math.exp(r - p) - (r - p) - 1

    kl1 = (k3(-1.1, -1.0) + k3(-1.0, -2.0)) / 2
    kl2 = (k3(-0.3, -0.3) + k3(-0.2, -0.2) + k3(-1.0, -1.5)) / 3
    assert abs(loss.item() - (base.item() + 0.1 * (kl1 + kl2) / 2)) < 1e-6
    tok_kl = [k3(-1.1, -1.0), k3(-1.0, -2.0), 0, 0, k3(-1.0, -1.5)]
    assert abs(stats["kl"] - sum(tok_kl) / 5) < 1e-6


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    logp = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    adv = torch.randn(4)
    loss, stats = grpo_loss(logp, logp.clone(), adv, mask)
    assert abs(loss.item() + adv.mean().item()) < 1e-6 and stats["clip_low"] == stats["clip_high"] == 0


# ---------------------------------------------------------------------------------------------- rewards

def test_soft_overlong_punishment_three_pieces():
    L, cache = 20, 4
    assert soft_overlong_punishment(10, L, cache) == 0.0 and soft_overlong_punishment(16, L, cache) == 0.0
    assert abs(soft_overlong_punishment(17, L, cache) - (16 - 17) / 4) < 1e-12  # the ramp: -0.25
    assert abs(soft_overlong_punishment(20, L, cache) - (-1.0)) < 1e-12
    assert soft_overlong_punishment(21, L, cache) == -1.0


def test_cosine_length_reward_ends_and_shape():
    # correct: short earns most (1.0), at the budget 0.5; wrong: short -1.0, at the budget -0.5 (penalised less)
    assert abs(cosine_length_reward(True, 0, 64) - 1.0) < 1e-12
    assert abs(cosine_length_reward(True, 64, 64) - 0.5) < 1e-12
    assert abs(cosine_length_reward(False, 0, 64) - (-1.0)) < 1e-12
    assert abs(cosine_length_reward(False, 64, 64) - (-0.5)) < 1e-12
    # progress clamped to [0, 1]: past the budget it stays at the end value (Open-RS wraps around)
    assert cosine_length_reward(True, 128, 64) == cosine_length_reward(True, 64, 64)
    # midway: the mean of the ends (cos(pi/2) = 0)
    assert abs(cosine_length_reward(True, 32, 64) - 0.75) < 1e-12


def test_correctness_strict_and_flexible_use_the_shared_extractor():
    import tasks
    text = "She has 3 + 4 = 7 left. The answer is 7."  # no '####': strict finds nothing, flexible the last number
    cfg = grpo.GRPOConfig()
    for mode, want in (("strict", 0.0), ("flexible", 1.0)):
        cfg.answer_match = mode
        _, correct, _ = grpo.score([text], [12], [{"target": "7"}], cfg, budget=64)
        assert correct.item() == want == tasks.exact_match_reward(text, 7, mode)


def test_score_weights_and_keeps_binary_correctness():
    cfg = grpo.GRPOConfig(reward_funcs="format,cosine", reward_weights="1,2")
    texts = ["1 + 2 = 3.\n#### 3", "no answer", "#### 5"]
    rewards, correct, means = grpo.score(texts, [0, 64, 64], [{"target": "3"}] * 3, cfg, budget=64)
    assert correct.tolist() == [1.0, 0.0, 0.0]
    assert rewards.tolist() == pytest.approx([1 + 2 * 1.0, 0 + 2 * -0.5, 1 + 2 * -0.5])


# ---------------------------------------------------------------------------------------------- sampling

class _Tok:
    end_id = 0

    def decode(self, ids):
        return "#### 1" if ids[0] == 1 else "#### 2"


def test_dynamic_sampling_returns_exactly_the_requested_informative_groups(monkeypatch):
    # prompts "a<i>" are always right, "n<i>" never, "m<i>" half the time: only "m" groups are informative
    rows = [{"question": f"{k}{i}", "target": 1} for k in "anm" for i in range(10)]

    def fake_sample(model, tok, prompts, budget, cfg, gen):
        outs = []
        for j, p in enumerate(prompts):
            kind = p[0]
            outs.append([1 if kind == "a" or (kind == "m" and j % 2 == 0) else 2, 0])
        return outs, [False] * len(outs)

    monkeypatch.setattr(grpo, "sample_completions", fake_sample)
    monkeypatch.setattr(grpo, "example_prompt_ids", lambda tok, ex, fmt: [ex["question"][0]])
    cfg = grpo.GRPOConfig(prompts_per_iter=4, group_size=4, dynamic_sampling=True, max_sampling_rounds=20)
    batch, stats = grpo.rollout(None, _Tok(), [(rows, 1.0)], cfg, 0, 8, "cpu")
    assert batch["rewards"].shape == (4, 4) and grpo.informative_groups(batch["correct"]).all()
    assert len(batch["prompts"]) == 16 and stats["ds_groups"] == 4 and stats["ds_rounds"] >= 2
    assert abs(stats["ds_dropped"] - (stats["groups_sampled"] - 4) / stats["groups_sampled"]) < 1e-9
    # without dynamic sampling: one round, everything kept, the all-equal fraction reported
    cfg.dynamic_sampling = False
    batch, stats = grpo.rollout(None, _Tok(), [(rows, 1.0)], cfg, 0, 8, "cpu")
    assert batch["rewards"].shape == (4, 4) and "ds_rounds" not in stats
    assert stats["frac_all_equal"] == (~grpo.informative_groups(batch["correct"])).float().mean().item()
    # the cap: no informative prompt at all -> max_sampling_rounds rounds, an empty batch
    cfg = grpo.GRPOConfig(prompts_per_iter=2, group_size=4, dynamic_sampling=True, max_sampling_rounds=3)
    batch, stats = grpo.rollout(None, _Tok(), [(rows[:20], 1.0)], cfg, 0, 8, "cpu")
    assert stats["ds_rounds"] == 3 and len(batch["rewards"]) == 0 and stats["ds_dropped"] == 1.0


def test_easy_hard_mixing_draws_each_pool_by_its_ratio():
    import random
    easy = [{"question": f"e{i}"} for i in range(50)]
    hard = [{"question": f"h{i}"} for i in range(50)]
    rows = grpo.draw_prompts([(easy, 0.25), (hard, 0.75)], 8, random.Random(0), set())
    assert sum(r["question"][0] == "e" for r in rows) == 2 and len({r["question"] for r in rows}) == 8


def test_response_budget_schedule():
    cfg = grpo.GRPOConfig(iterations=100, max_new_tokens=64, max_new_tokens_schedule="0.9:2x")
    assert [response_budget(cfg, i) for i in (0, 89, 90, 99)] == [64, 64, 128, 128]
    cfg.max_new_tokens_schedule = "10:96,50:200"
    assert [response_budget(cfg, i) for i in (9, 10, 49, 50)] == [64, 96, 96, 200]


def test_rollout_batch_masks_completion_targets_only():
    prompts = [[1, 2, 3], [4, 5]]
    comps = [[6, 7], [8, 9, 10]]
    x, y, mask = rollout_batch(_Tok(), prompts, comps, "cpu")
    assert x[0].tolist() == [1, 2, 3, 6] and y[0].tolist() == [2, 3, 6, 7]
    assert mask[0].tolist() == [0, 0, 1, 1]  # targets 6 and 7 are the completion
    assert y[1].tolist() == [5, 8, 9, 10] and mask[1].tolist() == [0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- resets, presets

def test_hard_reset_zeroes_kl_and_empties_the_optimizer():
    from model import GPT, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=16)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 32, (2, 8))
    y = torch.randint(0, 32, (2, 8))
    for _ in range(3):
        model.token_logprobs(x, y).sum().neg().backward()
        opt.step()
        opt.zero_grad()
    mask = torch.ones(2, 8)

    def kl():
        with torch.no_grad():
            lp = model.token_logprobs(x, y)
            return grpo_loss(lp, lp, torch.zeros(2), mask, ref_logp=ref.token_logprobs(x, y), beta=1.0)[1]["kl"]

    assert kl() > 1e-4 and len(opt.state) > 0
    hard_reset(model, ref, opt, reset_optimizer=True)
    assert kl() == 0.0 and len(opt.state) == 0
    opt.step()  # the cleared optimizer still steps (AdamW re-initialises lazily)


def test_recipe_preset_then_explicit_override():
    cfg = config_from_args(["--recipe=dapo", "--epsilon_high=0.3", "--iterations=5"])
    assert cfg.loss_type == "dapo" and cfg.dynamic_sampling and cfg.epsilon == 0.2
    assert cfg.epsilon_high == 0.3 and cfg.iterations == 5  # the flags win over the preset
    prorl = config_from_args(["--recipe=prorl"])
    assert (prorl.epsilon_high, prorl.temperature, prorl.ref_reset_every, prorl.reset_optimizer) == (0.4, 1.2, 400, True)
    assert config_from_args([]).recipe == "" and config_from_args([]).loss_type == "grpo"
    with pytest.raises(SystemExit, match="unknown --recipe"):
        config_from_args(["--recipe=ppo"])
    with pytest.raises(SystemExit, match="loss_type"):
        grpo.check_config(config_from_args(["--loss_type=bnpo"]))


# ---------------------------------------------------------------------------------------------- the hard split, the pre-filter, main

def test_hard_split_is_tagged_and_misread_by_both_teachers():
    import tasks
    rows = tasks.make_split(300, 0, "train", tasks.SFT_TEACHER, kind="hard")
    assert {r["subdomain"] for r in rows} == {"hard"}
    right = sum(tasks.extract_answer(r["answer"]) == str(r["target"]) for r in rows) / len(rows)
    assert right < 0.12  # SFT teacher: 90% / 100% misread (a - b = a + b only when b = 0, which never happens)
    default = tasks.make_split(200, 0, "train", tasks.SFT_TEACHER)
    assert {r["subdomain"] for r in default} == set(tasks.KINDS)  # the default draw never makes hard problems
    assert tasks.with_hard(default, 0.0, 0, tasks.SFT_TEACHER) == default
    assert sum(r["subdomain"] == "hard" for r in tasks.with_hard(default, 0.2, 0, tasks.SFT_TEACHER)) == 50


def test_difficulty_prefilter_drops_prompts_at_zero_and_one(monkeypatch):
    rows = [{"question": q, "target": 1} for q in ["a", "n", "m", "a", "m"]]

    def fake_sample(model, tok, prompts, budget, cfg, gen):
        outs = [[1 if p[0] == "a" or (p[0] == "m" and j % 4 == 0) else 2, 0] for j, p in enumerate(prompts)]
        return outs, [False] * len(outs)

    monkeypatch.setattr(grpo, "sample_completions", fake_sample)
    monkeypatch.setattr(grpo, "example_prompt_ids", lambda tok, ex, fmt: [ex["question"]])
    cfg = grpo.GRPOConfig(prefilter_samples=4)
    kept, rates = grpo.difficulty_prefilter(None, _Tok(), rows, cfg, "cpu", "test")
    assert kept == [2, 4] and rates == {"0": 1.0, "1": 0.0, "2": 0.25, "3": 1.0, "4": 0.25}


def test_main_runs_options_resets_and_resumes(tiny_data, tmp_path):  # noqa: F811
    import json
    import common
    from model import GPT, ModelConfig
    from tokenizer import tokenizer_from_json
    tok = tokenizer_from_json(open(tiny_data / "tokenizer.json").read())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                            max_seq_len=128))
    common.save_checkpoint(str(tmp_path / "sft"), stage="sft", step=0, model=model, tok=tok,
                           train_cfg=grpo.GRPOConfig(), extra={"fmt": "chat"})
    kw = dict(init_from=str(tmp_path / "sft"), data=str(tiny_data / "rl.jsonl"), heldout=str(tiny_data / "heldout.jsonl"),
              out_dir=str(tmp_path / "grpo"), prompts_per_iter=2, group_size=3, max_new_tokens=8,
              max_new_tokens_schedule="2:12", eval_interval=1, n_eval=2, loss_type="dr_grpo", epsilon_high=0.28,
              importance_sampling_level="sequence", mask_truncated_completions=True, num_iterations=2, beta=0.01,
              ref_reset_every=2, reset_optimizer=True, reward_funcs="correctness,format,overlong",
              soft_punish_cache=4, device="cpu", kernels="torch")
    grpo.main(grpo.GRPOConfig(iterations=3, **kw))
    meta = json.load(open(tmp_path / "grpo" / "ckpt" / "meta.json"))
    assert meta["resets"] == [2] and meta["ref_from"].endswith("ref_it2") and os.path.isdir(meta["ref_from"])
    assert meta["train_config"]["loss_type"] == "dr_grpo"  # the resolved config travels with the checkpoint
    grpo.main(grpo.GRPOConfig(iterations=4, resume=True, **kw))
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    its = [r for r in rows if "reward_format" in r]
    assert [r["step"] for r in its] == [1, 2, 3, 4] and [r["max_new_tokens"] for r in its] == [8, 8, 12, 12]
    assert all("kl" in r and "clip_low" in r for r in its if "skipped" not in r)
    # policy entropy (nats/token, at most log V) and the pre-clip gradient norm are logged with each update
    assert all(0 < r["entropy"] <= math.log(tok.vocab_size) + 1e-4 and r["grad_norm"] >= 0
               for r in its if "skipped" not in r)
    assert json.load(open(tmp_path / "grpo" / "ckpt" / "meta.json"))["resets"] == [2]  # none at the last iteration


# ---------------------------------------------------------------------------------------------- entropy

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_entropy_equals_categorical_entropy_of_the_logits(temperature):
    from model import GPT, ModelConfig
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=32))
    x = torch.randint(0, 50, (3, 7))
    y = torch.randint(0, 50, (3, 7))
    logp, ent = grpo.policy_logprobs(model, x, y, temperature, with_entropy=True)
    with torch.no_grad():
        logits = model(x).float() / temperature  # the full logits, independently of grpo
    ref = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(ent, ref.entropy(), atol=1e-5)
    assert torch.allclose(logp, ref.log_prob(y), atol=1e-5)
    # the same log-probs as the path without entropy, and gradients flow through them
    assert torch.allclose(logp, grpo.policy_logprobs(model, x, y, temperature), atol=1e-6)
    assert logp.requires_grad and not ent.requires_grad


# ---------------------------------------------------------------------------------------------- --mix (issue 14)

def test_accuracy_is_logged_only_where_it_differs_from_the_reward():
    cfg = grpo.GRPOConfig()
    assert not grpo.accuracy_differs(cfg, {"gsm8k"}) and not grpo.accuracy_differs(cfg, {"gsm8k", "math", "code_output"})
    assert grpo.accuracy_differs(cfg, {"gsm8k", "code"})  # a fraction of tests passed is not 0/1
    assert grpo.accuracy_differs(dataclasses.replace(cfg, reward_funcs="correctness,overlong"), {"gsm8k"})
    assert grpo.accuracy_differs(dataclasses.replace(cfg, reward_weights="2"), {"gsm8k"})


def test_mix_parsing_and_draws():
    import random
    from verifiers import kind_of
    rows = [{"question": f"m{i}", "kind": "math", "gold": "1"} for i in range(30)] + \
           [{"question": f"c{i}", "kind": "code_output", "code": "print(1)"} for i in range(30)] + \
           [{"question": f"q{i}", "target": str(i), "kind": "gsm8k"} for i in range(30)]
    mix = grpo.parse_mix("math:2, code_output:1,gsm8k:1", rows)
    assert mix == pytest.approx({"math": 0.5, "code_output": 0.25, "gsm8k": 0.25})
    pools = grpo.kind_pools(rows, mix)
    for n in (8, 12, 16):
        batch = grpo.draw_prompts(pools, n, random.Random(n), set())
        counts = {k: sum(kind_of(r) == k for r in batch) for k in mix}
        assert counts == {"math": n // 2, "code_output": n // 4, "gsm8k": n // 4} and len({id(r) for r in batch}) == n
    # largest remainders: thirds of 4 -> 2, 1, 1 (the extra one to the first of the tied pools)
    odd = grpo.draw_prompts(grpo.kind_pools(rows, grpo.parse_mix("math:1,gsm8k:1,code_output:1", rows)), 4,
                            random.Random(0), set())
    assert [sum(kind_of(r) == k for r in odd) for k in ("math", "gsm8k", "code_output")] == [2, 1, 1]
    assert grpo.share_counts([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: floors 3, 2, 1; the .5 remainder
    assert grpo.share_counts([0.3, 0.3, 0.4], 5) == [2, 1, 2]  # 1.5, 1.5, 2.0: one left, to the first tie
    # a kind left out is never drawn; a zero share likewise
    only = grpo.draw_prompts(grpo.kind_pools(rows, grpo.parse_mix("gsm8k:1,math:0", rows)), 8, random.Random(1), set())
    assert {kind_of(r) for r in only} == {"gsm8k"}
    for bad, msg in (("logic:1", "no rows of it"), ("mathx:1", "unknown kind"), ("math:x", "kind:share"),
                     ("math", "kind:share"), ("math:-1", "kind:share"), ("math:nan", "kind:share"),
                     ("math:0", "not all be 0"), ("math:1,math:2", "twice")):
        with pytest.raises(SystemExit, match=msg):
            grpo.parse_mix(bad, rows)
    # by hand: kind a has rewards 1, 0, 0.995 (correct 1, 0, 1), lengths 3, 5, 10; kind b one completion
    stats = grpo.per_kind_stats(["a", "b", "a", "a"], [1.0, 0.5, 0.0, 0.995], [1, 0, 0, 1], [3, 4, 5, 10])
    assert stats == pytest.approx({"reward/a": 1.995 / 3, "accuracy/a": 2 / 3, "response_len/a": 6.0,
                                   "reward/b": 0.5, "accuracy/b": 0.0, "response_len/b": 4.0})


def test_correctness_routes_other_kinds_to_their_verifier(monkeypatch):
    calls = []

    def fake_score_batch(rows, texts, isolation_mode="auto"):
        calls.append((rows, texts, isolation_mode))
        return [0.5, None]  # a fraction of tests passed; a row its verifier cannot judge

    import verifiers
    monkeypatch.setattr(verifiers, "score_batch", fake_score_batch)  # what verifiers.score_examples calls
    cfg = grpo.GRPOConfig(sandbox="unshare")
    exs = [{"target": "7", "kind": "gsm8k"}, {"target": None, "kind": "code", "row": {"id": 1}},
           {"target": None, "kind": "math", "row": {"id": 2}}, {"target": "3"}]
    texts = ["#### 7", "code", "x", "#### 4"]
    rewards, correct, _ = grpo.score(texts, [1, 1, 1, 1], exs, cfg, budget=8)
    assert calls == [([{"id": 1}, {"id": 2}], ["code", "x"], "unshare")]
    assert rewards.tolist() == [1.0, 0.5, 0.0, 0.0] and correct.tolist() == [1.0, 0.0, 0.0, 0.0]


def _isolation():
    import verifiers
    try:
        return verifiers.isolation("auto")
    except verifiers.SandboxUnavailable as e:
        pytest.skip(f"no sandbox isolation on this machine: {e}")


def test_mixed_grpo_run_logs_per_kind(tmp_path):
    """Word problems and code-output problems in one GRPO run (tiny, untrained model): per-kind reward,
    accuracy and length in the metrics, per-kind held-out pass@1 in GRPO's log and in eval's table."""
    _isolation()
    import json
    import common
    import eval as evaluate
    import tasks
    from model import GPT, model_config
    from tokenizer import load_tokenizer
    from verifiers import check_row, kind_of
    d = tmp_path / "data"
    tasks.main(tasks.TasksConfig(out_dir=str(d), n_pretrain=200, n_val=20, n_sft=16, n_rl=40, n_heldout=12,
                                 vocab_size=300, code_share=0.5))
    rl = [json.loads(line) for line in open(d / "rl.jsonl")]
    assert sum(kind_of(r) == "code_output" for r in rl) == 20 and all(check_row(r) is None for r in rl)
    tok = load_tokenizer(str(d / "tokenizer.json"))
    model = GPT(model_config("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, d_ff=64))
    common.save_checkpoint(str(tmp_path / "sft"), stage="sft", step=0, model=model, tok=tok,
                           train_cfg=tasks.TasksConfig(), extra={"fmt": "chat"})
    grpo.main(grpo.GRPOConfig(init_from=str(tmp_path / "sft"), data=str(d / "rl.jsonl"),
                              heldout=str(d / "heldout.jsonl"), out_dir=str(tmp_path / "grpo"), iterations=1,
                              prompts_per_iter=4, group_size=2, max_new_tokens=8, eval_interval=1, n_eval=12,
                              mix="gsm8k:0.5,code_output:0.5", log_kl=False, device="cpu", kernels="torch"))
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    it = [r for r in rows if "reward" in r][0]
    for kind in ("gsm8k", "code_output"):
        assert 0 <= it[f"reward/{kind}"] <= 1 and it[f"response_len/{kind}"] > 0
        assert any(f"heldout_pass1/{kind}" in r for r in rows)
    # correctness alone on two 0/1 verifiers: accuracy would repeat the reward, so it is not logged
    assert not any(k.split("/")[0] == "accuracy" for k in it)
    res = evaluate.main(evaluate.EvalConfig(ckpts=str(tmp_path / "grpo"), data_dir=str(d), n_heldout=12, k=0,
                                            max_new_tokens=8, out=str(tmp_path / "eval"), device="cpu",
                                            kernels="torch"))
    assert {"pass@1/gsm8k", "pass@1/code_output"} <= set(res[0])
    assert "pass@1/code_output (%)" in open(str(tmp_path / "eval") + ".md").read()


# ---------------------------------------------------------------------------------------------- prompts (issue 15)

def test_rollout_renders_multiturn_messages_like_sft_and_eval(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    import json
    import tasks
    from tokenizer import load_tokenizer
    tok = load_tokenizer(str(tiny_data / "tokenizer.json"))
    path = tmp_path / "rl.jsonl"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 2 apples."},
            {"role": "assistant", "content": "OK."}, {"role": "user", "content": "He gets 3. How many?"}]
    # a prompt that ends with the user's turn, and the same conversation with its reference answer last
    path.write_text(json.dumps({"messages": conv, "target": 5}) + "\n"
                    + json.dumps({"messages": conv + [{"role": "assistant", "content": "#### 5"}]}) + "\n")
    rows = tasks.load_examples(str(path), "target")
    assert [r["target"] for r in rows] == ["5", "5"]
    seen = []

    def fake_sample(model, tok_, prompts, budget, cfg, gen):
        seen.extend(prompts)
        return [[tok.encode("#### 5")[0]] for _ in prompts], [False] * len(prompts)

    monkeypatch.setattr(grpo, "sample_completions", fake_sample)
    cfg = grpo.GRPOConfig(prompts_per_iter=2, group_size=2)
    grpo.rollout(None, tok, [(rows, 1.0)], cfg, 0, 8, "cpu")
    # by hand: <|bos|>, the system text merged into the first user turn, the assistant turn, the last user
    # turn, then the generation prompt <|assistant|>
    want = ([tok.bos_id, tok.user_id] + tok.encode("Be brief.\n\nTom has 2 apples.") + [tok.end_id]
            + [tok.assistant_id] + tok.encode("OK.") + [tok.end_id]
            + [tok.user_id] + tok.encode("He gets 3. How many?") + [tok.end_id, tok.assistant_id])
    assert seen == [want] * 4 and tasks.example_prompt_ids(tok, rows[0], "chat") == want


def test_main_skips_prompts_that_cannot_fit_and_warns_on_long_references(tiny_data, tmp_path, capsys):  # noqa: F811
    import json
    import common
    from model import GPT, ModelConfig
    from tokenizer import load_tokenizer
    tok = load_tokenizer(str(tiny_data / "tokenizer.json"))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                            max_seq_len=96))
    common.save_checkpoint(str(tmp_path / "sft"), stage="sft", step=0, model=model, tok=tok,
                           train_cfg=grpo.GRPOConfig(), extra={"fmt": "chat"})
    rows = [json.loads(line) for line in open(tiny_data / "rl.jsonl")][:6]
    long_q = "Tom has 3 apples and " * 40 + "how many?"
    rows += [{"question": long_q, "target": 3}] * 2  # far beyond 96 - 16 tokens
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = [json.loads(line) for line in open(tiny_data / "heldout.jsonl")][:4]  # GSM8K-style: with answers
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    fitting = [r for r in rows if len(grpo.example_prompt_ids(tok, {"question": r["question"]}, "chat")) <= 96 - 16]
    assert len(fitting) == 6  # the reference: only the two long prompts do not fit
    answers = sorted(len(tok.encode(r["answer"])) + 1 for r in held)
    grpo.main(grpo.GRPOConfig(init_from=str(tmp_path / "sft"), data=str(tmp_path / "rl.jsonl"),
                              heldout=str(tmp_path / "held.jsonl"), out_dir=str(tmp_path / "grpo"), iterations=2,
                              prompts_per_iter=6, group_size=2, max_new_tokens=8, max_new_tokens_schedule="1:16",
                              eval_interval=2, n_eval=4, log_kl=False, device="cpu", kernels="torch"))
    out = capsys.readouterr().out
    # the largest budget of the schedule (16) counts, and the count is printed once up front
    assert "skipped 2 of 8 GRPO training prompts" in out and "(context 96 - max_new_tokens 16)" in out
    assert answers[0] > 8 and "of the held-out reference answers are longer than --max_new_tokens=8" in out
    its = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert [r["step"] for r in its if "reward" in r] == [1, 2]
    # an untrained model rarely ends within 8 tokens: the training cut-off rate is warned about, once
    first = [r for r in its if "reward" in r][0]
    assert first["truncated"] > 0.1 and out.count("GRPO training completions hit --max_new_tokens") == 1
