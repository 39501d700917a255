"""Reliability (issue 10): atomic writes, config checks and --help, checkpoints that survive divergence,
reruns, concurrent runs and pre-emption, resume checks. Fault injection by monkeypatching or subprocess +
signals, on the tiny preset, a few steps each."""
import dataclasses
import errno
import json
import os

import pytest

import common
import eval as evaluate
import grpo
import pretrain
import sft


# ---------------------------------------------------------------------------------------------
# --help and config validation

@pytest.mark.parametrize("cfg", [pretrain.PretrainConfig(), sft.SFTConfig(), grpo.GRPOConfig(), evaluate.EvalConfig()])
def test_help_lists_every_field_with_default_and_comment(cfg, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = {l.split()[0].split("=")[0]: l for l in out.splitlines() if l.startswith("  --")}
    assert set(lines) == {f"--{f.name}" for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert lines[f"--{f.name}"].split()[0] == f"--{f.name}={shown}"
    # the comment written beside the field in the source is shown beside it
    comments = common.field_comments(type(cfg))
    assert comments, "every stage config has commented fields"
    for name, text in comments.items():
        assert lines[f"--{name}"].rstrip().endswith(text)
    for f in dataclasses.fields(cfg):  # every field has a text: its own comment or the shared one
        assert lines[f"--{f.name}"].rstrip().endswith(comments.get(f.name) or common.COMMON_HELP[f.name])


def test_help_reads_the_comment_from_the_source():
    @dataclasses.dataclass
    class C:
        a: int = 1          # the first
        b: str = "x#y"      # a '#' inside a default is not a comment
        c: float = 0.5      # spans
                            # two lines
        d: int = dataclasses.field(default=3, metadata={"help": "from metadata"})
        e: bool = False
    assert common.field_comments(C) == {"a": "the first", "b": "a '#' inside a default is not a comment",
                                        "c": "spans two lines", "d": "from metadata"}


@pytest.mark.parametrize("argv,msg", [
    (["--device=cdua"], r"--device=cdua is not a known device"),
    (["--grad_accum=0"], r"--grad_accum=0 must be > 0"),
    (["--ckpt_interval=0"], r"--ckpt_interval=0 must be > 0"),
    (["--eval_interval=-5"], r"--eval_interval=-5 must be > 0"),
    (["--batch_size=-1"], r"--batch_size=-1 must be > 0"),
    (["--lr=nan"], r"--lr=nan is not a finite number"),
    (["--warmup_steps=-1"], r"--warmup_steps=-1 must be >= 0"),
    (["--kernels=cuda"], r"--kernels must be auto, torch or triton"),
    (["--max_steps"], r"--max_steps needs a value"),
])
def test_bad_config_values_get_one_line(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        common.parse_config(pretrain.PretrainConfig(), argv)


def test_given_keys_are_remembered():
    cfg = common.parse_config(pretrain.PretrainConfig(), ["--lr=0.003", "--compile"])  # lr equal to its default
    assert common.given_keys(cfg) == {"lr", "compile"} and cfg.compile is True
    assert common.given_keys(pretrain.PretrainConfig(max_steps=7)) == {"max_steps"}


# ---------------------------------------------------------------------------------------------
# Atomic writes

def test_atomic_write_text_bytes_json(tmp_path):
    p = tmp_path / "f"
    common.atomic_write(p, "text")
    assert p.read_text() == "text"
    common.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    common.atomic_write(p, {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    assert os.listdir(tmp_path) == ["f"]  # no temporary file left behind


def test_crash_during_atomic_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text("old\n")
    with pytest.raises(RuntimeError):
        with common.atomic_open(p) as f:
            f.write("half of the new content")
            raise RuntimeError("killed")
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["f.jsonl"]


def test_full_disk_is_named_and_changes_nothing(tmp_path, monkeypatch):
    p = tmp_path / "f"
    p.write_text("old")
    real_fsync = os.fsync

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(SystemExit, match=r"disk full \(ENOSPC\) while writing .*f; it was left as it was"):
        common.atomic_write(p, "new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    """Incident: Metrics rewrote metrics.jsonl with open('w'); a kill during the rewrite lost most of it."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 2001)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(lines) + '{"step": 20')  # a killed run's half line
    real_replace = os.replace

    def killed(*a, **k):
        raise KeyboardInterrupt  # the kill lands after the new content is written, before it is renamed in

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        common.Metrics(str(tmp_path), resume_step=1000)
    assert path.read_text() == "".join(lines) + '{"step": 20'  # untouched
    monkeypatch.setattr(os, "replace", real_replace)
    common.Metrics(str(tmp_path), resume_step=1000)
    assert path.read_text() == "".join(lines[:1000]) and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_tokenizer_and_jsonl_writers_are_atomic(tmp_path, monkeypatch):
    import tasks
    from tokenizer import train_tokenizer
    tok = train_tokenizer(["some text to learn merges from"] * 20, 270)
    calls = []
    real = common.atomic_open

    def spy(path, mode="w"):
        calls.append(os.path.basename(path))
        return real(path, mode)

    monkeypatch.setattr(common, "atomic_open", spy)
    tok.save(str(tmp_path / "tokenizer.json"))
    tasks.write_jsonl(str(tmp_path / "rows.jsonl"), [{"a": 1}])
    assert calls == ["tokenizer.json", "rows.jsonl"]
    assert json.loads((tmp_path / "rows.jsonl").read_text()) == {"a": 1}


# ---------------------------------------------------------------------------------------------
# Checkpoints and runs, on the tiny preset

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from demo_fixture import tiny_data  # noqa: E402,F401  (session fixture)
from model import GPT  # noqa: E402

FAST = dict(batch_size=4, seq_len=32, eval_batches=1, log_interval=1, eval_interval=100, device="cpu",
            kernels="torch", warmup_steps=2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pcfg(data, out, **kw):
    return pretrain.PretrainConfig(data_dir=str(data), out_dir=str(out), **{**FAST, "max_steps": 6, **kw})


def step_of(ckpt):
    return json.load(open(os.path.join(ckpt, "meta.json")))["step"]


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


@pytest.fixture(scope="module")
def run6(tiny_data, tmp_path_factory):  # noqa: F811
    """A finished 6-step pretraining run with a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("run6")
    pretrain.main(pcfg(tiny_data, out, ckpt_interval=2))
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_keep_last_keeps_whole_checkpoints(run6, tiny_data, tmp_path):  # noqa: F811
    assert sorted(n for n in os.listdir(run6) if n.startswith("ckpt")) == ["ckpt", "ckpt-4"]
    assert step_of(run6 / "ckpt") == 6 and step_of(run6 / "ckpt-4") == 4
    for d in ("ckpt", "ckpt-4"):
        assert set(os.listdir(run6 / d)) == {"model.pt", "optim.pt", "rng.pt", "meta.json", "tokenizer.json"}
        common.load_checkpoint(str(run6 / d))  # whole: loads
    pretrain.main(pcfg(tiny_data, tmp_path / "k3", max_steps=4, ckpt_interval=1, keep_last=3))
    assert sorted(n for n in os.listdir(tmp_path / "k3") if n.startswith("ckpt")) == ["ckpt", "ckpt-2", "ckpt-3"]
    # init_from takes a history entry too (rolling back by hand)
    _, _, meta, _ = common.load_checkpoint(str(tmp_path / "k3" / "ckpt-2"))
    assert meta["step"] == 2


def test_crash_between_the_renames_loads_the_newest_history_entry(run6, tmp_path):
    out = copy_run(run6, tmp_path / "r")
    os.rename(out / "ckpt", out / "ckpt-6")  # the instant after ckpt/ was moved aside, before ckpt.tmp/ came in
    assert common.find_checkpoint(str(out)) == str(out / "ckpt-6")
    legacy = tmp_path / "legacy"  # the older layout: only ckpt.old/ survived
    os.makedirs(legacy)
    shutil.copytree(run6 / "ckpt", legacy / "ckpt.old")
    assert common.find_checkpoint(str(legacy)) == str(legacy / "ckpt.old")


def test_divergence_keeps_the_last_good_checkpoint(run6, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """Incident: with a 1-step checkpoint interval a run that went NaN saved NaN weights over the only checkpoint,
    and the message claimed nothing was saved after the last good checkpoint."""
    out = copy_run(run6, tmp_path / "r")
    good = (out / "ckpt" / "model.pt").read_bytes()
    real_forward = GPT.forward
    calls = {"n": 0}

    def nan_from_the_second_step(self, idx, targets=None):
        out_ = real_forward(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 2:
                return out_ * float("nan")
        return out_

    monkeypatch.setattr(GPT, "forward", nan_from_the_second_step)
    with pytest.raises(SystemExit, match=r"loss is nan at step 7\. .*last good checkpoint: .*ckpt \(step 7\)"):
        pretrain.main(pcfg(tiny_data, out, max_steps=9, ckpt_interval=1, resume=True))
    assert step_of(out / "ckpt") == 7 and step_of(out / "ckpt-6") == 6
    assert (out / "ckpt-6" / "model.pt").read_bytes() == good


def test_nonfinite_weights_are_never_saved(run6, tmp_path):
    out = copy_run(run6, tmp_path / "r")
    before = (out / "ckpt" / "model.pt").read_bytes()
    model, tok, _, _ = common.load_checkpoint(str(out))
    with torch.no_grad():
        model.blocks[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match=r"diverged by step 7 \(non-finite weights .*\); not saved\. The last good "
                                         r"checkpoint: .*ckpt \(step 6\)"):
        common.save_checkpoint(str(out), stage="pretrain", step=7, model=model, tok=tok,
                               train_cfg=pretrain.PretrainConfig())
    assert (out / "ckpt" / "model.pt").read_bytes() == before and not (out / "ckpt.tmp").exists()


def _poison(ckpt, value, stage=None):
    state = torch.load(ckpt / "model.pt", weights_only=True)
    if value is None:
        state = {k: v * 1e30 if v.dim() == 2 else v for k, v in state.items()}  # finite but blown up
    elif value == "keep":
        pass
    else:
        next(v for v in state.values() if v.is_floating_point())[0] = value
    torch.save(state, ckpt / "model.pt")
    if stage:
        meta = json.load(open(ckpt / "meta.json"))
        meta["stage"], meta["fmt"] = stage, "chat"
        json.dump(meta, open(ckpt / "meta.json", "w"))


@pytest.mark.parametrize("value", [float("nan"), None])
def test_grpo_and_eval_refuse_a_diverged_checkpoint(run6, tiny_data, tmp_path, value):  # noqa: F811
    """Incident: GRPO and eval on a NaN checkpoint ended in a traceback deep inside sampling."""
    out = copy_run(run6, tmp_path / "bad")
    _poison(out / "ckpt", value, stage="sft")
    d = str(tiny_data)
    with pytest.raises(SystemExit, match=r"holds (non-finite weights|weights up to .* whose outputs are not finite \(or all equal\)).*: "
                                         r"it diverged.*Use an older one: .*ckpt-4"):
        grpo.main(grpo.GRPOConfig(init_from=str(out), data=f"{d}/rl.jsonl", heldout=f"{d}/heldout.jsonl",
                                  out_dir=str(tmp_path / "g"), iterations=1, prompts_per_iter=2, group_size=2,
                                  max_new_tokens=4, n_eval=0, device="cpu", kernels="torch"))
    with pytest.raises(SystemExit, match="it diverged"):
        evaluate.main(evaluate.EvalConfig(ckpts=str(out), data_dir=d, out=str(tmp_path / "e"), device="cpu",
                                          kernels="torch"))


def test_rerun_without_resume_is_refused_and_changes_nothing(run6, tiny_data, tmp_path):  # noqa: F811
    """Incident: rerunning pretrain (or SFT, GRPO) in a finished run's out_dir wiped its metrics and checkpoint."""
    out = copy_run(run6, tmp_path / "r")
    snapshot = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "ckpt/model.pt", "ckpt-4/model.pt")}
    d = str(tiny_data)
    runs = [lambda: pretrain.main(pcfg(tiny_data, out)),
            lambda: sft.main(sft.SFTConfig(init_from=str(run6), data=f"{d}/sft.jsonl", out_dir=str(out), device="cpu")),
            lambda: grpo.main(grpo.GRPOConfig(init_from=str(run6), data=f"{d}/rl.jsonl", out_dir=str(out), device="cpu"))]
    for start in runs:
        with pytest.raises(SystemExit, match=r"already holds a run \(ckpt, ckpt-4, metrics.jsonl\)\. Pass "
                                             r"--resume=true to continue it, --overwrite=true to replace it"):
            start()
    assert {p: (out / p).read_bytes() for p in snapshot} == snapshot
    assert not (out / "run.lock").exists()
    pretrain.main(pcfg(tiny_data, out, max_steps=2, overwrite=True))
    assert step_of(out / "ckpt") == 2 and not (out / "ckpt-4").exists()


def test_script_without_arguments_destroys_nothing(tmp_path):
    """Issue 15 point 3: `python pretrain.py` with no arguments in a folder that holds a run."""
    stage = tmp_path / "out" / "pretrain"
    os.makedirs(stage)
    (stage / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    r = subprocess.run([sys.executable, os.path.join(REPO, "pretrain.py"), "--device=cpu"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: out/pretrain already holds")
    assert (stage / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_replaced(tiny_data, tmp_path):  # noqa: F811
    """Incident: two runs in one out_dir shared ckpt.tmp and crashed inside save_checkpoint."""
    out = tmp_path / "r"
    os.makedirs(out)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (out / "run.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(SystemExit, match=rf"another run \(pid {other.pid}, started x\) is using .*r\. Wait for it"):
            pretrain.main(pcfg(tiny_data, out, max_steps=2))
    finally:
        other.kill()
        other.wait()
    pretrain.main(pcfg(tiny_data, out, max_steps=2))  # the owner is gone: the lock is stale
    assert step_of(out / "ckpt") == 2 and not (out / "run.lock").exists()


def test_sigterm_saves_at_the_end_of_the_step_and_resume_restores_the_settings(tiny_data, tmp_path,  # noqa: F811
                                                                               monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain.main(pcfg(tiny_data, full, max_steps=5, ckpt_interval=100))
    real_sample = pretrain.sample_batch
    calls = {"n": 0}

    def preempted_during_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the scheduler's SIGTERM arrives in the middle of step index 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*a, **k)

    monkeypatch.setattr(pretrain, "sample_batch", preempted_during_step_3)
    with pytest.raises(SystemExit) as e:
        pretrain.main(pcfg(tiny_data, part, max_steps=5, ckpt_interval=100))
    assert e.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 3" in capsys.readouterr().out
    assert step_of(part / "ckpt") == 3 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    # resume passing nothing but out_dir: the saved settings (batch, seq_len, warmup, data, ...) are restored
    pretrain.main(pretrain.PretrainConfig(out_dir=str(part), resume=True))
    assert [s for s, _ in losses(part)] == list(range(1, 6))
    for (_, a), (_, b) in zip(losses(full), losses(part)):
        assert abs(a - b) < 1e-6


def test_second_signal_exits_at_once(tmp_path):
    run = common.Run(pretrain.PretrainConfig(out_dir=str(tmp_path)), "pretrain", None)
    run.in_loop = True
    run._handle(signal.SIGTERM, None)
    assert run.signal == signal.SIGTERM
    with pytest.raises(SystemExit) as e:
        run._handle(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        run._handle(signal.SIGINT, None)


def test_sigterm_to_a_real_process(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    cmd = [sys.executable, os.path.join(REPO, "pretrain.py"), f"--data_dir={tiny_data}", f"--out_dir={out}",
           "--device=cpu", "--kernels=torch", "--batch_size=4", "--seq_len=32", "--max_steps=100000",
           "--log_interval=1", "--ckpt_interval=100000", "--eval_interval=100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time
    deadline = time.time() + 90
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.2)
    with pytest.raises(SystemExit, match=rf"another run \(pid {p.pid}, "):  # the lock holds against a second run
        pretrain.main(pcfg(tiny_data, out, max_steps=2, resume=True))
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=90)
    assert p.returncode == 128 + signal.SIGTERM, text
    assert f"Resume with: python pretrain.py --out_dir={out} --resume=true" in text
    done = step_of(out / "ckpt")
    assert done == len([r for r in losses(out)]) and not (out / "run.lock").exists()


# ---------------------------------------------------------------------------------------------
# Resume checks

def test_resume_refuses_a_change_that_would_not_apply(run6, tiny_data, tmp_path, capsys):  # noqa: F811
    out = copy_run(run6, tmp_path / "r")
    with pytest.raises(SystemExit, match=r"--model=135m cannot apply to a resumed run"):
        pretrain.main(pcfg(tiny_data, out, max_steps=8, resume=True, model="135m"))
    with pytest.raises(SystemExit, match=r"resuming with changed --weight_decay \(0.1 -> 0.5\).*allow_config_change"):
        pretrain.main(pcfg(tiny_data, out, max_steps=8, resume=True, weight_decay=0.5))
    assert "changed from the saved run: max_steps 6 -> 8, weight_decay 0.1 -> 0.5" in capsys.readouterr().out
    pretrain.main(pcfg(tiny_data, out, max_steps=8, resume=True, weight_decay=0.5, allow_config_change=True))
    groups = torch.load(out / "ckpt" / "optim.pt", weights_only=True)["param_groups"]
    assert groups[0]["weight_decay"] == 0.5  # the allowed change applies (the optimizer state would have kept 0.1)
    assert json.load(open(out / "ckpt" / "meta.json"))["train_config"]["weight_decay"] == 0.5


def test_grpo_resume_with_a_new_lr(run6, tiny_data, tmp_path):  # noqa: F811
    """Incident: a resumed GRPO run ignored a new --lr (the optimizer state restored the old one) but recorded it."""
    base = copy_run(run6, tmp_path / "sft")
    _poison(base / "ckpt", "keep", stage="sft")  # relabelled as an SFT checkpoint
    d = str(tiny_data)
    g = dict(init_from=str(base), data=f"{d}/rl.jsonl", heldout=f"{d}/heldout.jsonl", out_dir=str(tmp_path / "g"),
             iterations=1, prompts_per_iter=2, group_size=2, max_new_tokens=4, n_eval=0, log_kl=False,
             eval_interval=1, device="cpu", kernels="torch")
    grpo.main(grpo.GRPOConfig(**g))
    with pytest.raises(SystemExit, match=r"changed --lr \(0.0001 -> 0.001\)"):
        grpo.main(grpo.GRPOConfig(**{**g, "iterations": 2, "resume": True, "lr": 1e-3}))
    grpo.main(grpo.GRPOConfig(**{**g, "iterations": 2, "resume": True, "lr": 1e-3, "allow_config_change": True}))
    groups = torch.load(tmp_path / "g" / "ckpt" / "optim.pt", weights_only=True)["param_groups"]
    assert [x["lr"] for x in groups] == [1e-3]


def test_grpo_with_an_absurd_lr_stops_with_one_line(run6, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """Incident: GRPO with an absurd learning rate saved weights of 2.5e36 and exited 0."""
    # the tiny model earns no reward, so give the groups a learning signal: +1/-1 advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda r, *a, **k: torch.tensor([1.0, -1.0]).repeat(r.shape[0], 1))
    base = copy_run(run6, tmp_path / "sft")
    _poison(base / "ckpt", "keep", stage="sft")
    d = str(tiny_data)
    with pytest.raises(SystemExit, match=r"(diverged by step 1|is nan at step 1).*last good checkpoint: none in"):
        grpo.main(grpo.GRPOConfig(init_from=str(base), data=f"{d}/rl.jsonl", out_dir=str(tmp_path / "g"), lr=1e30,
                                  iterations=2, prompts_per_iter=2, group_size=2, max_new_tokens=4, n_eval=0,
                                  log_kl=False, eval_interval=1, device="cpu", kernels="torch"))
    assert not (tmp_path / "g" / "ckpt").exists()


@pytest.mark.parametrize("damage,msg", [
    ("optim.pt", r"optim.pt is damaged \(.*\), so this run cannot resume exactly"),
    ("rng.pt", r"rng.pt is damaged"),
    ("meta_list", r"meta.json is not a checkpoint's meta.json \(a JSON list"),
    ("meta_step", r"meta.json has no valid 'step' \(expected a int, found '6'\)"),
])
def test_damaged_training_state_gets_one_line(run6, tiny_data, tmp_path, damage, msg):  # noqa: F811
    out = copy_run(run6, tmp_path / "r")
    if damage.endswith(".pt"):
        p = out / "ckpt" / damage
        p.write_bytes(p.read_bytes()[:50])
    else:
        meta = json.load(open(out / "ckpt" / "meta.json"))
        json.dump([meta] if damage == "meta_list" else {**meta, "step": "6"}, open(out / "ckpt" / "meta.json", "w"))
    with pytest.raises(SystemExit, match=msg):
        pretrain.main(pcfg(tiny_data, out, max_steps=8, resume=True))


def test_full_disk_during_a_checkpoint(run6, tmp_path, monkeypatch):
    out = copy_run(run6, tmp_path / "r")
    model, tok, _, _ = common.load_checkpoint(str(out))
    real_save = torch.save

    def enospc(obj, path, *a, **k):
        if str(path).endswith("optim.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 5678: "
                               "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(SystemExit, match=r"disk full \(ENOSPC\) while saving the step-7 checkpoint .*The last good "
                                         r"checkpoint: .*ckpt \(step 6\)\. Free some space and resume"):
        common.save_checkpoint(str(out), stage="pretrain", step=7, model=model, tok=tok,
                               train_cfg=pretrain.PretrainConfig(), optimizer=torch.optim.SGD(model.parameters(), 0.1))
    assert not (out / "ckpt.tmp").exists() and step_of(out / "ckpt") == 6


def test_grad_accum_zero_and_bad_intervals_refused_at_start(tiny_data, tmp_path):  # noqa: F811
    """Incident: --grad_accum=0 trained nothing and exited 0."""
    for kw, msg in ((dict(grad_accum=0), "--grad_accum=0 must be > 0"), (dict(ckpt_interval=0), "--ckpt_interval=0"),
                    (dict(device="cdua"), "--device=cdua is not a known device")):
        with pytest.raises(SystemExit, match=msg):
            pretrain.main(pcfg(tiny_data, tmp_path / "r", **kw))
    assert not (tmp_path / "r" / "run.lock").exists()


# ---------------------------------------------------------------------------------------------
# SFT: checkpoints during training, resume, saved before its report

def sft_cfg(base, d, out, **kw):
    return sft.SFTConfig(init_from=str(base), data=f"{d}/sft.jsonl", heldout=f"{d}/heldout.jsonl", out_dir=str(out),
                         **{**dict(batch_size=8, n_eval=4, k=0, device="cpu", kernels="torch"), **kw})


def test_sft_saves_before_its_report_and_resumes(run6, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """Incident (issue 15): SFT read its held-out file only after training and saved only at the very end."""
    d = str(tiny_data)

    def report_fails(*a, **k):
        raise RuntimeError("held-out file broken")

    monkeypatch.setattr(sft, "heldout_accuracy", report_fails)
    with pytest.raises(RuntimeError):
        sft.main(sft_cfg(run6, d, tmp_path / "s", epochs=0.25))
    meta = json.load(open(tmp_path / "s" / "ckpt" / "meta.json"))
    assert meta["stage"] == "sft" and meta["finished"] and meta["alpha"] == 0.9
    monkeypatch.undo()
    # interrupted mid-training: resumes to the same weights as an uninterrupted run
    sft.main(sft_cfg(run6, d, tmp_path / "full", epochs=1.0, n_eval=0))
    real_collate = sft.collate
    calls = {"n": 0}

    def preempted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_collate(*a, **k)

    monkeypatch.setattr(sft, "collate", preempted)
    with pytest.raises(SystemExit):
        sft.main(sft_cfg(run6, d, tmp_path / "part", epochs=1.0, n_eval=0))
    monkeypatch.undo()
    assert step_of(tmp_path / "part" / "ckpt") == 5
    sft.main(sft.SFTConfig(out_dir=str(tmp_path / "part"), resume=True))
    a = torch.load(tmp_path / "full" / "ckpt" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "ckpt" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
