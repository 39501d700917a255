"""Spectrum SFT (VibeThinker): specialist choice per sub-domain, uniform fusion, and the run end to end."""
import json

import torch

import common
import sft
from demo_fixture import tiny_data  # noqa: F401  (session fixture)
from model import GPT, ModelConfig
from tokenizer import tokenizer_from_json


def test_pick_specialists_by_pass_at_k_then_pass1_then_later():
    def acc(p1, pk):
        return {"pass@1": p1, "pass@4": pk}

    scores = {10: {"add": acc(50, 90), "sub": acc(10, 40)},
              20: {"add": acc(60, 80), "sub": acc(20, 40)},
              30: {"add": acc(40, 90), "sub": acc(20, 40)}}
    # add: pass@4 90 at steps 10 and 30, pass@1 breaks the tie (50 > 40); sub: all 40, pass@1 20 at 20 and 30 -> later
    assert sft.pick_specialists(scores, 4) == {"add": 10, "sub": 30}


def test_fuse_is_the_uniform_average():
    torch.manual_seed(0)
    states = [{"w": torch.randn(3, 2), "b": torch.randn(2)} for _ in range(3)]
    fused = sft.fuse(states)
    for name in ("w", "b"):
        torch.testing.assert_close(fused[name], (states[0][name] + states[1][name] + states[2][name]) / 3)


def test_spectrum_sft_end_to_end_saves_the_fused_model(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    real_fuse = sft.fuse

    def recording_fuse(states):
        calls.append((states, real_fuse(states)))
        return calls[-1][1]

    monkeypatch.setattr(sft, "fuse", recording_fuse)
    tok = tokenizer_from_json(open(tiny_data / "tokenizer.json").read())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                            max_seq_len=256))
    common.save_checkpoint(str(tmp_path / "pre"), stage="pretrain", step=0, model=model, tok=tok,
                           train_cfg=sft.SFTConfig(), extra={"fmt": "plain"})
    cfg = sft.SFTConfig(init_from=str(tmp_path / "pre"), data=str(tiny_data / "sft.jsonl"),
                        heldout=str(tiny_data / "heldout.jsonl"), probe=str(tiny_data / "probe.jsonl"),
                        out_dir=str(tmp_path / "sft"), batch_size=16, n_eval=2, k=2, probe_every=2, probe_n=1,
                        probe_k=2, save_fused=True, alpha=1.0, device="cpu", kernels="torch")
    sft.main(cfg)
    meta = json.load(open(tmp_path / "sft" / "ckpt" / "meta.json"))
    spec = meta["spectrum"]
    assert set(spec["specialists"]) == {"add", "sub", "two_step", "compare"}
    assert set(spec["probe"]) == {"2", "4"}  # 64 examples / 16 = 4 steps: snapshots at 2 and 4 (the last)
    assert "fused" in spec["heldout"] and any(k.startswith("last snapshot") for k in spec["heldout"])
    # what was saved (alpha = 1) is the fusion of one snapshot per sub-domain
    (states, fused), = calls
    assert len(states) == 4 and meta["fused"]
    saved, _, _, _ = common.load_checkpoint(str(tmp_path / "sft"))
    for name, v in saved.state_dict().items():
        torch.testing.assert_close(v, fused[name].to(v.dtype), rtol=1e-6, atol=1e-6)
