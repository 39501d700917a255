"""The memory plan (memory.py) against PyTorch's own accounting: parameter counts against the built
model, activation bytes against the tensors autograd actually saves for the backward, and activation
checkpointing against the plain backward (same gradients, only block inputs kept)."""
import dataclasses
import random

import pytest
import torch

import memory
from model import GPT, ModelConfig

torch.set_num_threads(2)


def random_cfg(rng):
    hd = rng.choice([8, 16])
    n_kv = rng.choice([1, 2])
    n_head = n_kv * rng.choice([1, 2, 3])
    return ModelConfig(vocab_size=rng.randint(50, 150), n_layer=rng.choice([1, 2, 3]), n_head=n_head,
                       n_kv_head=n_kv, d_model=n_head * hd, d_ff=rng.choice([24, 40, 72]), max_seq_len=64)


def saved_bytes(model, idx, amp):
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward of hidden_states."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model.hidden_states(idx)
    return sum(seen.values())


def per_token_layer(cfg, amp, checkpointing=False):
    """Measured saved bytes per token and layer: differences over batch size and depth cancel the
    per-step parts (weight casts, RoPE tables, the embedding's indices)."""
    def run(n_layer, B):
        torch.manual_seed(0)
        m = GPT(ModelConfig(**{**cfg.__dict__, "n_layer": n_layer}))
        m.gradient_checkpointing = checkpointing
        return saved_bytes(m, torch.randint(0, cfg.vocab_size, (B, 16)), amp)
    per_token_1 = (run(1, 4) - run(1, 2)) / 32
    per_token_2 = (run(2, 4) - run(2, 2)) / 32
    return per_token_2 - per_token_1


def test_param_counts_match_the_model():
    rng = random.Random(0)
    for _ in range(5):
        cfg = random_cfg(rng)
        total, _ = memory.param_counts(cfg)
        assert total == GPT(cfg).num_params()


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_activation_bytes_match_saved_tensors(amp):
    rng = random.Random(1 + amp)
    for _ in range(2):
        cfg = random_cfg(rng)
        got = per_token_layer(cfg, amp)
        assert got == memory.activation_bytes_per_token_layer(cfg, "bf16" if amp else "fp32"), cfg


def test_checkpointing_keeps_block_inputs_only_and_same_gradients():
    cfg = random_cfg(random.Random(3))
    # only each block's fp32 input stays alive between forward and backward
    assert per_token_layer(cfg, False, checkpointing=True) == 4 * cfg.d_model
    torch.manual_seed(0)
    a = GPT(cfg)
    b = GPT(cfg)
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    y = torch.randint(0, cfg.vocab_size, (3, 20))
    la, lb = a(x, y), b(x, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_largest_micro_batch_is_the_boundary():
    cfg = memory.model_config("135m")
    mc = memory.MemoryConfig(model="135m", seq_len=2048)
    card = 40e9
    mb = memory.largest_micro_batch(cfg, mc, card)
    at = memory.peak_bytes(memory.estimate(cfg, dataclasses.replace(mc, batch=mb)))
    above = memory.peak_bytes(memory.estimate(cfg, dataclasses.replace(mc, batch=mb + 1)))
    assert mb >= 1 and at <= card < above


def test_grpo_peak_takes_the_larger_phase_not_the_sum():
    cfg = memory.model_config("135m")
    mc = memory.MemoryConfig(stage="grpo", batch=4, seq_len=512, rollouts=256, prompt_len=256, gen_len=1024)
    parts = memory.estimate(cfg, mc)
    kv = parts["KV cache (rollouts)"]
    # hand computation of the KV cache: rollouts x tokens x layers x (K, V) x kv heads x head dim x bf16
    assert kv == 256 * 1280 * 30 * 2 * 3 * 64 * 2
    update = parts["gradients"] + parts["activations"] + parts["loss"]
    persistent = sum(parts.values()) - kv - update
    sub = persistent + max(kv, update)
    assert memory.peak_bytes(parts) == pytest.approx(sub + memory.GiB + 0.05 * sub)


def test_auto_micro_batch_keeps_the_global_batch(monkeypatch):
    """On the CPU the choice comes from the estimate: the largest divisor of the global batch that fits."""
    cfg = random_cfg(random.Random(4))
    model = GPT(cfg)
    mc = memory.MemoryConfig(seq_len=32, kernels="torch", dtype="fp32")
    need = [memory.peak_bytes(memory.estimate(cfg, dataclasses.replace(mc, batch=b)))
            for b in range(1, 13)]
    monkeypatch.setattr(memory, "available_bytes", lambda device: (need[4] + need[5]) / 2 / 0.9)  # 5 fit, 6 not
    micro, accum = memory.auto_micro_batch(model, 12, 32, "cpu", "torch")
    assert (micro, accum) == (4, 3)  # 5 is not a divisor of 12; 4 x 3 keeps the 12 sequences
    monkeypatch.setattr(memory, "available_bytes", lambda device: need[0] / 2)
    with pytest.raises(SystemExit, match="not even one sequence"):
        memory.auto_micro_batch(model, 12, 32, "cpu", "torch")


def test_command_line_prints_the_plan(capsys):
    from common import parse_config
    memory.main(parse_config(memory.MemoryConfig(), ["--model=135m", "--stage=grpo", "--card_gb=80"]))
    out = capsys.readouterr().out
    assert "KV cache (rollouts)" in out and "80 GB card: fits" in out
