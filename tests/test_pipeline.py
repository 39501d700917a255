"""Checkpoints, resume, bad input, and every stage end to end for a few steps on the tiny config."""
import json
import os

import pytest
import torch

import common
import eval as evaluate
import grpo
import pretrain
import report
import sft
from demo_fixture import tiny_data  # noqa: F401  (session fixture)
from model import GPT, model_config
from tokenizer import train_tokenizer

FAST = dict(batch_size=8, seq_len=64, eval_batches=2, log_interval=2, device="cpu", kernels="torch")


def pretrain_cfg(data, out, **kw):
    return pretrain.PretrainConfig(data_dir=str(data), out_dir=str(out), **{**FAST, "max_steps": 6,
                                                                            "warmup_steps": 2, **kw})


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pretrain")
    pretrain.main(pretrain_cfg(tiny_data, out, max_steps=6, eval_interval=3, ckpt_interval=3))
    return out


def test_checkpoint_round_trip(pretrained):
    model, tok, meta, ckpt = common.load_checkpoint(str(pretrained))
    assert meta["stage"] == "pretrain" and meta["step"] == 6 and meta["tokenizer"] == tok.fingerprint
    raw = torch.load(os.path.join(ckpt, "model.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])
    assert set(os.listdir(ckpt)) == {"model.pt", "optim.pt", "rng.pt", "meta.json", "tokenizer.json"}


def test_crash_mid_write_leaves_previous_checkpoint_whole(pretrained, tmp_path, monkeypatch):
    import shutil
    stage = tmp_path / "stage"
    shutil.copytree(pretrained, stage)
    model, tok, meta, _ = common.load_checkpoint(str(stage))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = torch.save

    def crash_on_optimizer(obj, path, *a, **k):  # dies after the new weights were written
        if str(path).endswith("optim.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(OSError):
        common.save_checkpoint(str(stage), stage="pretrain", step=99, model=model, tok=tok,
                               train_cfg=pretrain.PretrainConfig(), optimizer=torch.optim.SGD(model.parameters(), 0.1))
    monkeypatch.undo()
    again, _, meta2, _ = common.load_checkpoint(str(stage))
    assert meta2["step"] == 6
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k])


def test_resume_reproduces_uninterrupted_run(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain.main(pretrain_cfg(tiny_data, full, max_steps=8, ckpt_interval=4, eval_interval=4))
    real_save = pretrain.save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise Interrupted  # killed right after the step-4 checkpoint

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        pretrain.main(pretrain_cfg(tiny_data, part, max_steps=8, ckpt_interval=4, eval_interval=4))
    monkeypatch.undo()
    pretrain.main(pretrain_cfg(tiny_data, part, max_steps=8, ckpt_interval=4, eval_interval=4, resume=True))
    a, b = losses(full), losses(part)
    assert [s for s, _ in a] == [s for s, _ in b] == [2, 4, 6, 8]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-6
    wa, _, _, _ = common.load_checkpoint(str(full))
    wb, _, _, _ = common.load_checkpoint(str(part))
    for (k, va), vb in zip(wa.state_dict().items(), wb.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)


def test_every_stage_end_to_end(tiny_data, pretrained, tmp_path, capsys):  # noqa: F811
    d = str(tiny_data)
    sft.main(sft.SFTConfig(init_from=str(pretrained), data=f"{d}/sft.jsonl", heldout=f"{d}/heldout.jsonl",
                           out_dir=str(tmp_path / "sft"), batch_size=16, n_eval=8, k=2, device="cpu",
                           kernels="torch", alpha=0.5))
    meta = json.load(open(tmp_path / "sft" / "ckpt" / "meta.json"))
    assert meta["stage"] == "sft" and set(meta["alpha_report"]) == {"0.0", "0.5", "1.0"}
    grpo.main(grpo.GRPOConfig(init_from=str(tmp_path / "sft"), data=f"{d}/rl.jsonl", heldout=f"{d}/heldout.jsonl",
                              out_dir=str(tmp_path / "grpo"), iterations=2, prompts_per_iter=4, group_size=4,
                              max_new_tokens=24, eval_interval=2, n_eval=8, beta=0.05, device="cpu",
                              kernels="torch"))
    rows = [json.loads(l) for l in open(tmp_path / "grpo" / "metrics.jsonl")]
    it_rows = [r for r in rows if "reward" in r]
    assert len(it_rows) == 2 and all(0 <= r["reward"] <= 1 and "kl" in r and "frac_all_equal" in r for r in it_rows)
    out = tmp_path / "eval"
    res = evaluate.main(evaluate.EvalConfig(ckpts=f"{pretrained},{tmp_path / 'sft'},{tmp_path / 'grpo'}",
                                            data_dir=d, n_heldout=8, k=2, max_new_tokens=24, out=str(out),
                                            device="cpu", kernels="torch"))
    assert [r["stage"] for r in res] == ["pretrain", "sft", "grpo"]
    assert all(r["val_loss"] > 0 and r["bpb"] > 0 and 0 <= r["pass@1"] <= 100 for r in res)
    table = open(str(out) + ".md").read().splitlines()
    # rows are labelled by checkpoint: stage, directory and step (two SFT runs can be told apart)
    assert [l.split("|")[1].strip() for l in table[2:]] == [f"{r['stage']} ({r['ckpt']}, step {r['step']})" for r in res]
    # the report reads the stage directories laid out as the Makefile lays them out
    os.symlink(pretrained, tmp_path / "pretrain")
    os.rename(str(out) + ".md", tmp_path / "eval.md")
    report.main(report.ReportConfig(out_dir=str(tmp_path)))
    assert os.path.getsize(tmp_path / "report.png") > 1000
    assert f"| grpo ({res[2]['ckpt']}, step 2) |" in open(tmp_path / "report.md").read()


def test_text_loss_matches_hand_computed_bits_per_byte(pretrained):
    model, tok, _, _ = common.load_checkpoint(str(pretrained))
    texts = ["Question: Tom has 3 apples.", "Mia has 5 books.\n#### 5"]
    nll, bpb = evaluate.text_loss(model, tok, texts, "cpu")
    tot_nll = tot_tok = tot_bytes = 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.bos_id] + tok.encode(t)])
            logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)
            tot_nll -= logp[0, torch.arange(ids.size(1) - 1), ids[0, 1:]].sum().item()
            tot_tok += ids.size(1) - 1
            tot_bytes += len(t.encode())
    assert abs(nll - tot_nll / tot_tok) < 1e-4
    assert abs(bpb - tot_nll / tot_bytes / 0.6931471805599453) < 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing already written lost

def test_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*Run the previous stage"):
        common.load_checkpoint(str(tmp_path / "nope"))


def test_corrupt_checkpoint(pretrained, tmp_path):
    import shutil
    stage = tmp_path / "stage"
    shutil.copytree(pretrained, stage)
    path = stage / "ckpt" / "model.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="corrupt"):
        common.load_checkpoint(str(stage))


def test_wrong_stage_is_refused(tiny_data, pretrained, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="'pretrain' checkpoint; this stage needs"):
        grpo.main(grpo.GRPOConfig(init_from=str(pretrained), data=f"{tiny_data}/rl.jsonl",
                                  heldout=f"{tiny_data}/heldout.jsonl", out_dir=str(tmp_path / "g"), device="cpu"))


def test_shards_of_another_tokenizer_are_refused(tiny_data, pretrained, tmp_path):  # noqa: F811
    from shards import write_shards
    other = train_tokenizer(["completely different text, other merges"] * 50, 280)
    write_shards([other.encode("hello world " * 40)] * 4, other, str(tmp_path / "d"), "train")
    write_shards([other.encode("hello world " * 40)] * 4, other, str(tmp_path / "d"), "val")
    with pytest.raises(SystemExit, match="tokenizer .* but the model uses"):
        pretrain.main(pretrain_cfg(tmp_path / "d", tmp_path / "o", init_from=str(pretrained)))


def test_unknown_config_key():
    with pytest.raises(SystemExit, match="unknown config key 'lrr'"):
        common.parse_config(pretrain.PretrainConfig(), ["--lrr=1"])
    with pytest.raises(SystemExit, match="expects a int"):
        common.parse_config(pretrain.PretrainConfig(), ["--max_steps=many"])
    cfg = common.parse_config(pretrain.PretrainConfig(), ["--lr=0.5", "--resume=true", "--model=135m"])
    assert cfg.lr == 0.5 and cfg.resume is True and cfg.model == "135m"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_data, pretrained, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    import shutil
    stage = tmp_path / "stage"
    shutil.copytree(pretrained, stage)
    before = (stage / "ckpt" / "model.pt").read_bytes()
    real_forward = GPT.forward

    def nan_forward(self, idx, targets=None):
        out = real_forward(self, idx, targets)
        return out * float("nan") if targets is not None else out

    monkeypatch.setattr(GPT, "forward", nan_forward)
    with pytest.raises(SystemExit, match="loss is nan at step 6.*Lower --lr"):
        pretrain.main(pretrain_cfg(tiny_data, stage, max_steps=10, resume=True))
    assert (stage / "ckpt" / "model.pt").read_bytes() == before


def test_unknown_model_preset():
    with pytest.raises(SystemExit, match="unknown model config"):
        model_config("huge")


def test_135m_preset_has_smollm2_shape():
    cfg = model_config("135m")
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    assert 134e6 < n < 136e6  # SmolLM2-135M: 134.5M parameters with tied embeddings
