"""The real path as a user walks it: one row loader for SFT/GRPO/eval, max_new_tokens and truncation,
sample.py, model-size dials, threads, plain progress lines, and a miniature of the README's path."""
import io
import json
import os

import pytest
import torch

import common
import eval as evaluate
import grpo
import model as model_mod
import pretrain
import sample
import sft
import tasks
from demo_fixture import tiny_data  # noqa: F401  (session fixture)

CPU = dict(device="cpu", kernels="torch")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


GSM = {"question": "Ann has 2 pens and buys 3. How many?", "answer": "2 + 3 = 5.\n#### 5"}
QT = {"question": "What is 1,000 + 1?", "target": "1,001"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "#### 4"},
                     {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "4 * 3 = 12\n#### 12"}]}


@pytest.fixture(scope="module")
def tok(tiny_data):  # noqa: F811
    from tokenizer import load_tokenizer
    return load_tokenizer(os.path.join(tiny_data, "tokenizer.json"))


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pre")
    pretrain.main(pretrain.PretrainConfig(data_dir=str(tiny_data), out_dir=str(out), batch_size=8, seq_len=64,
                                          max_steps=4, warmup_steps=1, eval_interval=4, eval_batches=1,
                                          sample_lines=2, sample_tokens=8, **CPU))
    return out


# ---------------------------------------------------------------------------------------------
# The loader

def test_loader_takes_the_three_row_formats(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GSM, QT, CHAT])
    gsm, qt, chat = tasks.load_examples(path, "target")
    assert (gsm["question"], gsm["target"]) == (GSM["question"], "5")
    assert (qt["question"], qt["target"], qt["answer"]) == (QT["question"], "1001", None)
    # the prompt of a multi-turn row is everything before its last assistant turn, kept as written (a chat
    # template renders the system turn itself); nanoforge's own format joins system to the first user turn
    assert chat["question"] == "And times 3?" and chat["target"] == "12"
    assert [m["role"] for m in chat["context"]] == ["system", "user", "assistant", "user"]
    assert chat["context"][:2] == CHAT["messages"][:2]
    assert tasks.merge_system(chat["context"])[0]["content"] == "Be brief.\n\nWhat is 2 + 2?"
    # SFT needs something to train on: the {question, target} row is refused, counted and named
    with pytest.raises(SystemExit, match=r"1 of 3 rows .*rows\.jsonl:2 has nothing to train on"):
        tasks.load_examples(path, "answer")


def test_multi_turn_loss_mask_covers_every_assistant_turn(tok):
    ids, mask = tasks.chat_messages_ids(tok, tasks.merge_system(CHAT["messages"]))
    # built by hand from the format: <|bos|> then <|user|>..<|end|> / <|assistant|>..<|end|>
    u1, a1 = tok.encode("Be brief.\n\nWhat is 2 + 2?"), tok.encode("#### 4")
    u2, a2 = tok.encode("And times 3?"), tok.encode("4 * 3 = 12\n#### 12")
    B, U, A, E = tok.bos_id, tok.user_id, tok.assistant_id, tok.end_id
    want = [B, U] + u1 + [E, A] + a1 + [E, U] + u2 + [E, A] + a2 + [E]
    want_mask = [0, 0] + [0] * len(u1) + [0, 0] + [1] * len(a1) + [1, 0] + [0] * len(u2) + [0, 0] + [1] * len(a2) + [1]
    assert ids == want and mask == want_mask
    # one exchange renders exactly as the single-turn function
    assert tasks.chat_messages_ids(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) \
        == tasks.chat_example_ids(tok, "q", "a")


def test_loader_counts_bad_rows_and_names_the_first(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM, {"answer": "#### 3"}, QT, {"question": "q", "answer": "no number"},
                                                {"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(SystemExit, match=r'3 of 5 rows of held-out file .*bad\.jsonl:2 has no "question"'):
        tasks.load_examples(path, "target", "held-out")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(GSM).encode() + b'\n{"question": "caf\xe9", "target": 1}\n')
    with pytest.raises(SystemExit, match=r"latin1\.jsonl:2 is not UTF-8 .*re-encode"):
        tasks.load_examples(str(latin1), "target")
    with pytest.raises(SystemExit, match=r"has 0 usable rows"):
        tasks.load_examples(write_jsonl(tmp_path / "empty.jsonl", []), "target")


def test_grpo_and_sft_validate_every_input_before_loading_a_model(tmp_path):
    """The incidents: a GRPO row without a question, fewer rows than prompts_per_iter, a bad held-out file
    read only after SFT trained. All are refused before any checkpoint is read (init_from does not exist)."""
    good = write_jsonl(tmp_path / "rl.jsonl", [QT, GSM, CHAT])
    noq = write_jsonl(tmp_path / "noq.jsonl", [QT, {"target": 3}])
    none = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(SystemExit, match=r"noq\.jsonl:2 has no \"question\""):
        grpo.main(grpo.GRPOConfig(init_from=none, data=noq, heldout=good, out_dir=str(tmp_path / "g"), **CPU))
    with pytest.raises(SystemExit, match=r"has 3 usable rows; .*at least 16 \(--prompts_per_iter=16\)"):
        grpo.main(grpo.GRPOConfig(init_from=none, data=good, heldout=good, out_dir=str(tmp_path / "g"), **CPU))
    bad_heldout = write_jsonl(tmp_path / "held.jsonl", [GSM, {"question": "no answer at all"}])
    with pytest.raises(SystemExit, match=r"held\.jsonl:2 has no \"answer\" or \"target\""):
        sft.main(sft.SFTConfig(init_from=none, data=write_jsonl(tmp_path / "sft.jsonl", [GSM, CHAT]), heldout=bad_heldout, out_dir=str(tmp_path / "s"), **CPU))
    for out in (tmp_path / "g", tmp_path / "s"):  # nothing written: at most the run's lock, released at exit
        assert not os.path.exists(out) or set(os.listdir(out)) <= {"run.lock"}


# ---------------------------------------------------------------------------------------------
# max_new_tokens: prompts that cannot fit are skipped up front; cut-off completions are counted

def test_prompts_that_cannot_fit_are_skipped_and_counted(tok, capsys):
    exs = [{"question": "a " * n, "context": [{"role": "user", "content": "a " * n}]} for n in (5, 40, 200)]
    lens = [len(tasks.example_prompt_ids(tok, ex, "chat")) for ex in exs]
    budget = 64 - 16
    kept = evaluate.fit_prompts(tok, exs, "chat", 64, 16, "test prompts")
    assert kept == [ex for ex, n in zip(exs, lens) if n <= budget] and len(kept) < len(exs)
    assert f"skipped {len(exs) - len(kept)} of 3 test prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="leaves no room for a prompt"):
        evaluate.fit_prompts(tok, exs, "chat", 64, 64, "test prompts")


def test_truncation_flag():
    assert evaluate.truncated([5, 6, 7], 3, stop_id=9)          # used the whole budget, no stop
    assert not evaluate.truncated([5, 6, 9], 3, stop_id=9)      # stopped on the last allowed token
    assert not evaluate.truncated([5, 9], 3, stop_id=9)


# ---------------------------------------------------------------------------------------------
# Model size dials, presets, threads, progress lines

def test_size_flags_override_a_preset_and_135m_is_smollm2():
    cfg = model_mod.model_config("cpu", n_layer=2, d_model=128, n_head=4, n_kv_head=2, d_ff=256, vocab_size=300)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff) == (2, 128, 4, 2, 256)
    assert model_mod.model_config("cpu", n_layer=0).n_layer == model_mod.PRESETS["cpu"]["n_layer"]  # 0 = preset's
    with pytest.raises(SystemExit, match="multiple of --n_kv_head"):
        model_mod.model_config("cpu", n_head=6, n_kv_head=4)
    with pytest.raises(SystemExit, match="multiple of --n_head"):
        model_mod.model_config("cpu", d_model=100)
    # SmolLM2-135M's config.json / GGUF metadata
    c = model_mod.model_config("135m")
    assert (c.vocab_size, c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.max_seq_len, c.rope_theta,
            c.norm_eps) == (49152, 30, 576, 9, 3, 1536, 8192, 1e5, 1e-5)
    with torch.device("meta"):
        n = model_mod.GPT(model_mod.model_config("cpu", vocab_size=8192)).num_params()
    assert 10e6 < n < 20e6


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        n = common.set_threads()
        assert n == common.available_cpus() == torch.get_num_threads()
        if hasattr(os, "sched_getaffinity"):
            assert n <= len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert common.set_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_progress_prints_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    bar = common.progress(range(20), desc="work")
    assert isinstance(bar, common.PlainProgress)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("work: 20/20") and "loss=19.0" in lines[-1]


# ---------------------------------------------------------------------------------------------
# sample.py and pretraining's sampled lines

def test_pretrain_prints_samples_at_each_evaluation(pretrained, capsys):
    # the fixture ran pretraining; its output held the sampled lines (checked on a fresh call here)
    model, tok, _, _ = common.load_checkpoint(str(pretrained))
    cfg = pretrain.PretrainConfig(sample_lines=3, sample_tokens=5)
    lines = pretrain.sample_text(model, tok, cfg, "cpu")
    assert len(lines) == 3 and lines == pretrain.sample_text(model, tok, cfg, "cpu")  # seeded: comparable


def test_sample_py_prompt_and_chat(pretrained, tiny_data, tmp_path):  # noqa: F811
    out = []
    texts = sample.main(sample.SampleConfig(ckpt=str(pretrained), prompt="Question:", n_samples=3, max_new_tokens=6,
                                            temperature=0.0, **CPU), write=out.append)
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: the same three times
    assert out[0] == "--- sample 1/3" and out[1] == "Question:" + texts[0]
    # greedy text equals the model's own argmax continuation, computed here without generate()
    model, tok, _, _ = common.load_checkpoint(str(pretrained))
    ids = [tok.bos_id] + tok.encode("Question:")
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.bos_id:
                break
    assert texts[0] == tok.decode([t for t in new if t != tok.bos_id])
    with pytest.raises(SystemExit, match="--chat needs an SFT or GRPO checkpoint"):
        sample.main(sample.SampleConfig(ckpt=str(pretrained), chat=True, **CPU))
    # a chat checkpoint: a few SFT steps, then two turns of --chat from scripted input
    d = str(tiny_data)
    sft.main(sft.SFTConfig(init_from=str(pretrained), data=f"{d}/sft.jsonl", heldout=f"{d}/heldout.jsonl",
                           out_dir=str(tmp_path / "sft"), epochs=0.25, batch_size=16, n_eval=0, **CPU))
    said = iter(["What is 2 + 2?", "And 3 + 3?"])

    def read(_):
        try:
            return next(said)
        except StopIteration:
            raise EOFError  # Ctrl-D
    shown = []
    hist = sample.main(sample.SampleConfig(ckpt=str(tmp_path / "sft"), chat=True, max_new_tokens=8, **CPU),
                       read=read, write=shown.append)
    assert [m["role"] for m in hist] == ["user", "assistant", "user", "assistant"]
    assert sum(s.startswith("model> ") for s in shown) == 2


# ---------------------------------------------------------------------------------------------
# The report: only panels with points, no empty sections

def test_report_draws_only_what_was_logged(tmp_path):
    import report
    os.makedirs(tmp_path / "pretrain")
    write_jsonl(tmp_path / "pretrain" / "metrics.jsonl",
                [{"step": s, "loss": 5.0 / s, "grad_norm": 1.0 / s} for s in (1, 2, 3)] + [{"step": 3, "val_loss": 2.0}])
    report.main(report.ReportConfig(out_dir=str(tmp_path)))
    md = open(tmp_path / "report.md").read()
    assert "report.png" in md and "##" not in md  # no eval table, no SFT report: no empty headings
    m = {s: report.read_metrics(os.path.join(tmp_path, s, "metrics.jsonl")) for s in ("pretrain", "sft", "grpo")}
    assert report.plot_curves(m, str(tmp_path / "p.png")) == 2  # pretrain loss + grad norm
    os.makedirs(tmp_path / "grpo")
    write_jsonl(tmp_path / "grpo" / "metrics.jsonl",
                [{"step": 1, "reward": 0.1, "kl": 0.01, "response_len": 40, "frac_all_equal": 0.5, "truncated": 0.2,
                  "grad_norm": 0.3, "entropy": 1.0}, {"step": 1, "heldout_pass1": 12.5}])
    with open(tmp_path / "eval.md", "w") as f:
        f.write("| checkpoint | pass@1 (%) |\n|---|---:|\n| grpo (x, step 1) | 12.5 |\n")
    m["grpo"] = report.read_metrics(os.path.join(tmp_path, "grpo", "metrics.jsonl"))
    assert report.plot_curves(m, str(tmp_path / "p.png")) == 7  # + reward, KL, entropy, length, groups/cut-offs
    report.main(report.ReportConfig(out_dir=str(tmp_path)))
    assert "## Held-out evaluation\n\n| checkpoint" in open(tmp_path / "report.md").read()


# ---------------------------------------------------------------------------------------------
# A miniature of the README's real path, on files written here: text -> gate -> dedup -> tokenize ->
# pretrain -> SFT (GSM8K rows) -> GRPO (GSM8K rows) -> eval (GSM8K held-out, plain-text val) -> report

def _story(rng):
    names, things = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max"], ["ball", "kite", "cat", "box", "cake", "tree", "boat"]
    moods, verbs = ["happy", "sad", "tired", "brave", "kind"], ["saw", "found", "lost", "wanted", "made", "painted"]
    lines = []
    for _ in range(rng.randint(4, 7)):
        n, t = rng.choice(names), rng.choice(things)
        lines.append(f"{n} {rng.choice(verbs)} a {rng.choice(moods)} {t} near the {rng.choice(things)} "
                     f"and {rng.choice(verbs)} a {rng.choice(things)} with {rng.choice(names)} one {rng.choice(['day', 'night', 'morning'])}.")
    return " ".join(lines[:3]) + "\n" + " ".join(lines[3:])


def test_miniature_real_path(tmp_path):
    import random
    import subprocess
    import sys

    import report
    rng = random.Random(0)
    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(_story(rng) for _ in range(150)))
    gsm_train = [{"question": r["question"], "answer": r["answer"]} for r in tasks.make_split(48, 0, "train")]
    gsm_test = [{"question": r["question"], "answer": r["answer"]} for r in tasks.make_split(6, 0, "heldout")]
    train, test = write_jsonl(tmp_path / "train.jsonl", gsm_train), write_jsonl(tmp_path / "test.jsonl", gsm_test)
    o = tmp_path / "real"

    def cli(*argv):  # the README's commands, as a user runs them
        subprocess.run([sys.executable, *argv], check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                       stdout=subprocess.DEVNULL)
    cli("data.py", "gate", f"--inputs={text}", f"--out_dir={o}/gated", "--min_words=20")
    cli("dedup.py", f"--inputs={o}/gated", f"--out_dir={o}/dedup", f"--evals={test}", "--workers=1")
    cli("data.py", "tokenize", f"--inputs={o}/dedup", f"--out_dir={o}/data", "--vocab_size=300", "--val_every=10",
        "--workers=1")
    tiny = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=1, d_ff=128)
    pretrain.main(pretrain.PretrainConfig(model="cpu", **tiny, data_dir=f"{o}/data", out_dir=f"{o}/pretrain",
                                          batch_size=4, seq_len=64, max_steps=3, warmup_steps=1, eval_interval=3,
                                          eval_batches=1, sample_lines=1, sample_tokens=4, **CPU))
    sft.main(sft.SFTConfig(init_from=f"{o}/pretrain", data=train, heldout=test, out_dir=f"{o}/sft", batch_size=16,
                           n_eval=2, k=0, max_new_tokens=16, **CPU))
    grpo.main(grpo.GRPOConfig(init_from=f"{o}/sft", data=train, heldout=test, out_dir=f"{o}/grpo", iterations=1,
                              prompts_per_iter=2, group_size=2, max_new_tokens=16, n_eval=2, eval_interval=1, **CPU))
    rows = evaluate.main(evaluate.EvalConfig(ckpts=f"{o}/pretrain,{o}/sft,{o}/grpo", heldout=test, val_text=str(text),
                                             n_heldout=3, k=0, max_new_tokens=16, max_val_windows=4, out=f"{o}/eval",
                                             **CPU))
    assert [r["stage"] for r in rows] == ["pretrain", "sft", "grpo"] and all(r["n_heldout"] == 3 for r in rows)
    assert all(r["bpb"] > 0 and r["truncated"] >= 0 for r in rows)
    assert json.load(open(f"{o}/pretrain/ckpt/meta.json"))["model_config"]["d_model"] == 64  # the dials applied
    report.main(report.ReportConfig(out_dir=str(o)))
    assert "grpo (" in open(f"{o}/report.md").read()


def test_loader_passes_other_verifier_kinds_to_their_checks(tmp_path):
    code_row = {"prompt": "Write f.", "kind": "code", "tests": {"type": "assert", "asserts": ["assert f() == 1"]}}
    path = write_jsonl(tmp_path / "mix.jsonl", [QT, code_row])
    qt, code = tasks.load_examples(path, "target")
    assert (qt["kind"], code["kind"], code["question"], code["target"], code["row"]) == \
        ("gsm8k", "code", "Write f.", None, code_row)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Write f.", "kind": "code"}])
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1 a code row needs 'tests'"):
        tasks.load_examples(bad, "target")
