"""Data parallelism on this CPU: torch.distributed with the gloo backend and 2 processes.
N ranks x grad_accum A must train exactly like 1 rank x grad_accum N*A on the same data (pretrain and SFT),
and a 2-rank run resumed from its checkpoint must equal the uninterrupted 2-rank run. eval.py on 2 ranks
must give the same completions and numbers as on 1."""
import functools
import json
import os
import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp

import common
import eval as evaluation
import pretrain
import sft
from demo_fixture import tiny_data  # noqa: F401  (session fixture)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

PRE = dict(batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=1,
           ckpt_interval=2, device="cpu", kernels="torch")


class Interrupted(Exception):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, stage, cfg, stop_at_step, setup=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if setup is not None:
        setup()
    mod = {"pretrain": pretrain, "sft": sft, "eval": evaluation}[stage]
    if stop_at_step:  # every rank stops at the start of that step, as a killed job would after its checkpoint
        real_lr_at = pretrain.lr_at

        def lr_at(step, *a, **k):
            if step == stop_at_step:
                raise Interrupted
            return real_lr_at(step, *a, **k)
        mod.lr_at = lr_at
    try:
        mod.main(cfg)
    except Interrupted:
        pass


def run_ranks(stage, cfg, world=2, stop_at_step=0, setup=None):
    mp.start_processes(_worker, args=(world, _free_port(), stage, cfg, stop_at_step, setup), nprocs=world,
                       start_method="spawn")


def curve(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def assert_same_weights(a, b):
    ma, _, _, _ = common.load_checkpoint(str(a))
    mb, _, _, _ = common.load_checkpoint(str(b))
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def two_rank_pretrain(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pre2")
    run_ranks("pretrain", pretrain.PretrainConfig(data_dir=str(tiny_data), out_dir=str(out), grad_accum=1, **PRE))
    return out


def test_pretrain_two_ranks_equal_one_rank_with_accumulation(tiny_data, two_rank_pretrain, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    pretrain.main(pretrain.PretrainConfig(data_dir=str(tiny_data), out_dir=str(one), grad_accum=2, **PRE))
    a, b = curve(one), curve(two_rank_pretrain)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5)
    assert_same_weights(one, two_rank_pretrain)


def test_pretrain_two_rank_resume_equals_uninterrupted(tiny_data, two_rank_pretrain, tmp_path):  # noqa: F811
    out = tmp_path / "resumed"
    cfg = dict(data_dir=str(tiny_data), out_dir=str(out), grad_accum=1, **PRE)
    run_ranks("pretrain", pretrain.PretrainConfig(**cfg), stop_at_step=2)  # checkpoint at step 2, then killed
    assert common.load_checkpoint(str(out))[2]["step"] == 2
    run_ranks("pretrain", pretrain.PretrainConfig(**cfg, resume=True))
    assert curve(out) == curve(two_rank_pretrain)
    assert_same_weights(out, two_rank_pretrain)


def test_sft_two_ranks_equal_one_rank_with_accumulation(tiny_data, two_rank_pretrain, tmp_path):  # noqa: F811
    base = dict(init_from=str(two_rank_pretrain), data=str(tiny_data / "sft.jsonl"),
                heldout=str(tiny_data / "heldout.jsonl"), batch_size=4, epochs=0.5, warmup_steps=1, log_interval=1,
                n_eval=0, device="cpu", kernels="torch")
    one, two = tmp_path / "one", tmp_path / "two"
    sft.main(sft.SFTConfig(out_dir=str(one), grad_accum=2, **base))
    run_ranks("sft", sft.SFTConfig(out_dir=str(two), grad_accum=1, **base))
    a, b = curve(one), curve(two)
    assert len(a) == len(b) == 4  # 64 examples x 0.5 epochs / global batch 8
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5)
    assert_same_weights(one, two)


# ---------------------------------------------------------------------------------------------- eval.py

_text_loss = evaluation.text_loss


def _eval_setup(patch=None):
    """Both eval runs (1 process, 2 ranks): a scorer that depends on each item and its completion's exact text
    (a CRC: a quarter right, so a completion scored against the wrong item, or a different sample, shows) and
    records what it was given in $SCORED.<rank>; text-loss batches of 4 windows (so 2 ranks each score some)."""
    patch = patch or (lambda name, value: setattr(evaluation, name, value))

    def score_batch(rows, texts, isolation_mode=None):
        with open(f"{os.environ['SCORED']}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps([[r["question"] for r in rows], texts]) + "\n")
        return [float(zlib.crc32((r["question"] + t).encode()) % 4 == 0) for r, t in zip(rows, texts)]
    patch("score_batch", score_batch)
    patch("text_loss", functools.partial(_text_loss, batch_size=4))


def test_eval_two_ranks_equal_one_process(tiny_data, two_rank_pretrain, tmp_path, monkeypatch):  # noqa: F811
    # 16 held-out items: greedy in 2 chunks of 8, pass@4 samples in 8 chunks of 2 problems, split across ranks
    cfg = dict(ckpts=str(two_rank_pretrain), data_dir=str(tiny_data), n_heldout=16, k=4, batch_size=8,
               max_new_tokens=12, device="cpu", kernels="torch")
    _eval_setup(lambda name, value: monkeypatch.setattr(evaluation, name, value))
    monkeypatch.setenv("SCORED", str(tmp_path / "one"))
    evaluation.main(evaluation.EvalConfig(out=str(tmp_path / "one"), **cfg))
    monkeypatch.setenv("SCORED", str(tmp_path / "two"))  # the spawned ranks inherit it
    run_ranks("eval", evaluation.EvalConfig(out=str(tmp_path / "two"), **cfg), setup=_eval_setup)
    # every rank scored exactly the items and completions (greedy, then 4 samples each) one process did, in order
    scored = [open(tmp_path / name).read() for name in ("one.0", "two.0", "two.1")]
    assert scored[0] == scored[1] == scored[2] and len(scored[0].splitlines()) == 2
    one, two = (json.load(open(tmp_path / f"{n}.json"))["rows"][0] for n in ("one", "two"))
    assert one["n_heldout"] == two["n_heldout"] == 16
    assert 0 < one["pass@1"] < 100 and 0 < one["pass@4"] < 100  # the CRC scorer: not all equal
    for key in ("pass@1", "pass@4", "truncated"):
        assert one[key] == two[key], key
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-12)  # float64 sums, added in another order
    assert one["bpb"] == pytest.approx(two["bpb"], rel=1e-12)
