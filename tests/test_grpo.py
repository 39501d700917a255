import math

import torch

from grpo import group_advantages, grpo_loss, rollout_batch


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std of (1, 0, 0)
    expected = [[(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std]]
    torch.testing.assert_close(adv[:1], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # a group whose rewards are all equal carries no signal: advantage 0, not NaN
    adv_eps = group_advantages(rewards, eps=1e-4)
    assert torch.equal(adv_eps[1], torch.zeros(3))


def make_case():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0, -0.1], [-0.3, -0.9, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    return logp, old, mask, adv


def test_grpo_loss_by_hand():
    logp, old, mask, adv = make_case()
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    # sequence 1 (A = 2): ratios e^0.2 (clipped to 1.2) and 1; token 3 is masked
    seq1 = -(min(math.exp(0.2) * 2, 1.2 * 2) + 2.0) / 2
    # sequence 2 (A = -1): ratios 1, e^0.7, 1; for A < 0 the min keeps the unclipped -e^0.7
    seq2 = (1.0 + math.exp(0.7) + 1.0) / 3
    assert abs(loss.item() - (seq1 + seq2) / 2) < 1e-6
    assert abs(stats["clip_frac"] - 2 / 5) < 1e-6  # two of five completion tokens outside [0.8, 1.2]
    loss.backward()
    g = logp.grad
    assert g[0, 0] == 0  # clipped with A > 0: no push further
    assert abs(g[0, 1].item() - (-2.0 / 2 / 2)) < 1e-6  # -A / len / n_seq: raises log-prob of a good token
    assert g[0, 2] == 0  # masked
    assert abs(g[1, 1].item() - math.exp(0.7) / 3 / 2) < 1e-5  # unclipped for A < 0: ratio * |A| / len / n


def test_grpo_loss_k3_kl_by_hand():
    logp, old, mask, adv = make_case()
    ref = torch.tensor([[-1.1, -1.0, -0.5], [-0.3, -0.2, -1.0]])
    base, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2, ref_logp=ref, kl_coef=0.1)

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
    assert abs(loss.item() + adv.mean().item()) < 1e-6 and stats["clip_frac"] == 0


class _Tok:
    pass


def test_rollout_batch_masks_completion_targets_only():
    prompts = [[1, 2, 3], [4, 5]]
    comps = [[6, 7], [8, 9, 10]]
    x, y, mask = rollout_batch(_Tok(), prompts, comps, "cpu")
    assert x[0].tolist() == [1, 2, 3, 6] and y[0].tolist() == [2, 3, 6, 7]
    assert mask[0].tolist() == [0, 0, 1, 1]  # targets 6 and 7 are the completion
    assert y[1].tolist() == [5, 8, 9, 10] and mask[1].tolist() == [0, 1, 1, 1]
