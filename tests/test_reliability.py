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
