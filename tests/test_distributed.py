"""Data parallelism on this CPU: torch.distributed with the gloo backend and 2 processes.
N ranks x grad_accum A must train exactly like 1 rank x grad_accum N*A on the same data (pretrain and SFT),
and a 2-rank run resumed from its checkpoint must equal the uninterrupted 2-rank run. eval.py on 2 ranks
must give the same completions and numbers as on 1. GRPO on 2 ranks x P/2 prompts must train like 1 rank x P
prompts given the same completions."""
import dataclasses
import faulthandler
import functools
import json
import os
import socket
import warnings
import zlib

import pytest
import torch
import torch.multiprocessing as mp

import common
import eval as evaluation
import grpo
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
    faulthandler.enable()  # a rank killed by a native crash prints its Python stack (the report names only the signal)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if setup is not None:
        setup()
    mod = {"pretrain": pretrain, "sft": sft, "eval": evaluation, "grpo": grpo}[stage]
    if stop_at_step:  # every rank stops at the start of that step, as a killed job would after its checkpoint
        real_lr_at = pretrain.lr_at

        def lr_at(step, *a, **k):
            if step == stop_at_step:
                raise Interrupted
            return real_lr_at(step, *a, **k)
        mod.lr_at = lr_at
    try:
        mod.main(cfg)
    except Interrupted:  # shut down as a finished stage does
        torch.distributed.destroy_process_group()


def run_ranks(stage, cfg, world=2, stop_at_step=0, setup=None):
    """Runs `stage` on `world` spawned gloo ranks. A run whose rank was killed by a signal is run once more from the
    same inputs (a fresh training run with --overwrite=true, replacing what the crashed one wrote; a resumed one
    from its newest checkpoint), with a warning that names the signal: CI once saw rank 1 of the FSDP resume abort
    with glibc's "double free or corruption" (a heap error in native code, torch's or gloo's; the ranks run only
    Python of ours), and 83 reruns here (35 under full CPU load, 40 under glibc's heap checks) did not repeat it. A
    second crash, a Python exception in a rank (exit status 1) or a wrong result still fails the test."""
    def spawn(cfg):
        mp.start_processes(_worker, args=(world, _free_port(), stage, cfg, stop_at_step, setup), nprocs=world,
                           start_method="spawn")
    try:
        spawn(cfg)
    except mp.ProcessExitedException as e:
        if not e.signal_name:  # exited with a status (not a crash): a real failure
            raise
        warnings.warn(f"{stage}: rank {e.error_index} died by {e.signal_name}; running the {world} ranks again")
        if hasattr(cfg, "overwrite") and not cfg.resume:  # a fresh run replaces what the crashed one wrote
            cfg = dataclasses.replace(cfg, overwrite=True)
        spawn(cfg)


def curve(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def assert_same_weights(a, b, atol=1e-6):
    ma, _, _, _ = common.load_checkpoint(str(a))
    mb, _, _, _ = common.load_checkpoint(str(b))
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


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
    if patch is None:  # a spawned rank: its record starts empty (run_ranks may run the ranks twice)
        open(f"{os.environ['SCORED']}.{os.environ['RANK']}", "w").close()
    patch = patch or (lambda name, value: setattr(evaluation, name, value))

    def score_examples(rows, texts, isolation_mode=None):
        with open(f"{os.environ['SCORED']}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps([[r["question"] for r in rows], texts]) + "\n")
        return [float(zlib.crc32((r["question"] + t).encode()) % 4 == 0) for r, t in zip(rows, texts)]
    patch("score_examples", score_examples)
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


# ---------------------------------------------------------------------------------------------- GRPO

def _fake_completions(model, tok, prompts, budget, cfg, gen):
    """The completions of a prompt as a function of the prompt and its copy index only (not of the rank, the
    batch or the generator): the j-th copy of a prompt gets random tokens, 1..budget of them, from a generator
    seeded by (prompt, j). Records the prompts it was given in $SAMPLED.<rank>."""
    with open(f"{os.environ['SAMPLED']}.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(json.dumps(prompts) + "\n")
    outs, copy = [], 0
    for i, p in enumerate(prompts):
        copy = copy + 1 if i and prompts[i - 1] == p else 0
        g = torch.Generator().manual_seed(zlib.crc32(json.dumps(p).encode()) * 100 + copy)
        n = int(torch.randint(1, budget + 1, (1,), generator=g))
        outs.append(torch.randint(4, tok.vocab_size, (n,), generator=g).tolist())
    return outs, [len(o) == budget for o in outs]


def _grpo_setup(patch=None):
    if patch is None:  # a spawned rank: its record starts empty (run_ranks may run the ranks twice)
        open(f"{os.environ['SAMPLED']}.{os.environ['RANK']}", "w").close()
    patch = patch or (lambda name, value: setattr(grpo, name, value))
    patch("sample_completions", _fake_completions)


@pytest.fixture(scope="module")
def tiny_policy(tiny_data, tmp_path_factory):  # noqa: F811
    from model import GPT, ModelConfig
    from tokenizer import tokenizer_from_json
    tok = tokenizer_from_json(open(tiny_data / "tokenizer.json").read())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                            max_seq_len=128))
    out = tmp_path_factory.mktemp("policy")
    common.save_checkpoint(str(out), stage="sft", step=0, model=model, tok=tok, train_cfg=grpo.GRPOConfig(),
                           extra={"fmt": "chat"})
    return out


def test_grpo_two_ranks_equal_one_rank(tiny_data, tiny_policy, tmp_path, monkeypatch):  # noqa: F811
    # dapo: the token normaliser of the global batch; batch-scaled rewards: the std over both ranks' groups;
    # KL to the reference; 2 PPO epochs (two optimizer steps, each syncing once)
    opts = dict(loss_type="dapo", scale_rewards="batch", beta=0.04, num_iterations=2)
    # 4 prompts x 3 completions per iteration; micro-batches of 4 sequences: 3 micro-steps on 1 rank, 2 per rank
    # on 2 (gradient sync on the last only). Cosine length rewards: random lengths, so groups carry signal.
    cfg = dict(init_from=str(tiny_policy), data=str(tiny_data / "rl.jsonl"), iterations=2, prompts_per_iter=4,
               group_size=3, max_new_tokens=10, micro_batch=4, reward_funcs="cosine", lr=3e-3, n_eval=0,
               eval_interval=100, device="cpu", kernels="torch", **opts)
    _grpo_setup(lambda name, value: monkeypatch.setattr(grpo, name, value))
    monkeypatch.setenv("SAMPLED", str(tmp_path / "one"))
    grpo.main(grpo.GRPOConfig(out_dir=str(tmp_path / "one"), **cfg))
    monkeypatch.setenv("SAMPLED", str(tmp_path / "two"))
    run_ranks("grpo", grpo.GRPOConfig(out_dir=str(tmp_path / "two"), **cfg), setup=_grpo_setup)
    # whole groups per rank: each iteration's prompts split into two disjoint halves, their union the 1-rank batch
    one = [json.loads(line) for line in open(tmp_path / "one.0")]
    r0, r1 = ([json.loads(line) for line in open(tmp_path / f"two.{r}")] for r in (0, 1))
    assert len(one) == len(r0) == len(r1) == 2
    for it in range(2):
        assert r0[it] + r1[it] == one[it] and len(r0[it]) == len(r1[it]) == 6
        assert not {json.dumps(p) for p in r0[it]} & {json.dumps(p) for p in r1[it]}
    a, b = ([json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two"))
    a, b = [r for r in a if "reward" in r], [r for r in b if "reward" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["adv_abs"] > 0  # the batch carried a gradient
        for key in ("reward", "accuracy", "response_len", "truncated", "groups_sampled", "reward_cosine", "adv_abs"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=2e-6), key  # metrics.jsonl keeps 6 decimals
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
        assert ra["entropy"] == pytest.approx(rb["entropy"], rel=1e-5)  # a token mean over the global batch
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=5e-6)  # 4 AdamW steps amplify summation order
    moved = common.load_checkpoint(str(tmp_path / "one"))[0].state_dict()
    start = common.load_checkpoint(str(tiny_policy))[0].state_dict()
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-4  # the update was not a no-op


def test_grpo_two_rank_resume_equals_uninterrupted(tiny_data, tiny_policy, tmp_path):  # noqa: F811
    # real sampling: each rank's generator is seeded by (seed, iteration, rank), so a resumed rank samples what
    # the uninterrupted one did with no saved sampler state
    cfg = dict(init_from=str(tiny_policy), data=str(tiny_data / "rl.jsonl"), prompts_per_iter=4, group_size=3,
               max_new_tokens=8, micro_batch=4, reward_funcs="cosine", lr=3e-3, beta=0.04, n_eval=0,
               eval_interval=1, device="cpu", kernels="torch")
    run_ranks("grpo", grpo.GRPOConfig(out_dir=str(tmp_path / "whole"), iterations=2, **cfg))
    run_ranks("grpo", grpo.GRPOConfig(out_dir=str(tmp_path / "cut"), iterations=1, **cfg))
    run_ranks("grpo", grpo.GRPOConfig(out_dir=str(tmp_path / "cut"), iterations=2, resume=True, **cfg))
    a, b = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in open(tmp_path / n / "metrics.jsonl")] for n in ("whole", "cut"))
    assert a == b and [r["step"] for r in a] == [1, 2]
    assert_same_weights(tmp_path / "whole", tmp_path / "cut")


# ---------------------------------------------------------------------------------------------- FSDP2

def assert_same_optimizer_state(a, b):
    sa, sb = (torch.load(os.path.join(d, "ckpt", "optim.pt"), weights_only=True) for d in (a, b))
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i in sa["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa["state"][i][k], sb["state"][i][k], rtol=1e-5, atol=1e-7, msg=f"{i} {k}")


@pytest.fixture(scope="module")
def fsdp_pretrain(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks("pretrain", pretrain.PretrainConfig(data_dir=str(tiny_data), out_dir=str(out), grad_accum=2,
                                                  fsdp=True, **PRE))
    return out


def test_pretrain_fsdp_equals_one_process(tiny_data, fsdp_pretrain, tmp_path):  # noqa: F811
    # 2 ranks x grad_accum 2 with parameters sharded (fully_shard per block + root; gradients reduced on the last
    # micro-step only) against 1 process x grad_accum 4 on the same micro-batches
    one, out = tmp_path / "one", fsdp_pretrain
    pretrain.main(pretrain.PretrainConfig(data_dir=str(tiny_data), out_dir=str(one), grad_accum=4, **PRE))
    a, b = curve(out), curve(one)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5)
    norms = [[r["grad_norm"] for r in map(json.loads, open(d / "metrics.jsonl")) if "grad_norm" in r] for d in (out, one)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)  # AdamW would hide a mis-scaled gradient; the norm does not
    # the checkpoint is whole (gathered to rank 0): it loads in one process, its optimizer state in a plain AdamW.
    # Weights to 5e-6 (|w| ~ 0.1): the reduce-scatter sums in another order than one process, and AdamW's
    # m / sqrt(v) of tiny moments amplifies that rounding (measured max 1.8e-6 after 4 steps at lr 3e-3)
    assert_same_weights(out, one, atol=5e-6)
    assert_same_optimizer_state(out, one)


def test_pretrain_fsdp_resume_equals_uninterrupted(tiny_data, fsdp_pretrain, tmp_path):  # noqa: F811
    # the step-2 checkpoint (gathered whole) is re-sharded on resume, optimizer state included
    out = tmp_path / "resumed"
    cfg = dict(data_dir=str(tiny_data), out_dir=str(out), grad_accum=2, fsdp=True, **PRE)
    run_ranks("pretrain", pretrain.PretrainConfig(**cfg), stop_at_step=2)
    assert common.load_checkpoint(str(out))[2]["step"] == 2
    run_ranks("pretrain", pretrain.PretrainConfig(**cfg, resume=True))
    assert curve(out) == curve(fsdp_pretrain)
    assert_same_weights(out, fsdp_pretrain)
    assert_same_optimizer_state(out, fsdp_pretrain)
