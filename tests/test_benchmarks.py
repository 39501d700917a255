"""benchmarks.py: the harness's prompt strings per task, batched == unbatched scoring, metrics,
GSM8K extraction and pass@k, data reading (local layouts, a stand-in Hub), bad input.
Every fixture is written here; nothing needs ../shared/data or a network."""
import json
import math
import os
import random

import pytest
import torch

import benchmarks as B
import tasks
from model import GPT, ModelConfig
from tokenizer import train_tokenizer
from hub_standin import LocalHub, OfflineHub


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


# ---------------------------------------------------------------- one item of each task: exact strings

@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    write_jsonl(str(d / "hellaswag/hellaswag_val.x.jsonl"), [
        {"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he",
         "endings": ["is using wrap [title] to wrap skis.", " is ripping  tiles off. ", "x", "y"], "label": 3}])
    write_jsonl(str(d / "arc_easy/ARC-Easy-Test.jsonl"), [
        {"id": "q1", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "rock", "label": "3"}]},
         "answerKey": "2"}])
    write_jsonl(str(d / "arc_challenge/ARC-Challenge-Test.jsonl"), [
        {"id": "q2", "question": {"stem": "Pick B", "choices": [{"text": t, "label": l} for t, l in zip("wxyzv", "ABCDE")]},
         "answerKey": "B"}])
    write_jsonl(str(d / "piqa/valid.jsonl"), [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
                                              {"goal": "Dry hands", "sol1": "use a towel", "sol2": "use water"}])
    (d / "piqa/valid-labels.lst").write_text("0\n0\n")
    write_jsonl(str(d / "winogrande/dev.jsonl"), [
        {"qID": "a", "sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"}])
    write_jsonl(str(d / "openbookqa/openbook_qa.llmfoundry.jsonl"), [
        {"query": "Predators eat", "choices": ["lions", "humans", "bunnies", "grass"], "gold": 2}])
    write_jsonl(str(d / "lambada_openai/lambada_openai.llmfoundry.jsonl"), [
        {"context": "He looked at the sky and saw the", "continuation": "moon"}])
    os.makedirs(d / "mmlu/test")
    (d / "mmlu/test/high_school_physics_test.csv").write_text('" What is 1+1? ",1,2,3,4,B\n')
    write_jsonl(str(d / "gsm8k/test.jsonl"), [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}])
    write_jsonl(str(d / "gsm8k/train.jsonl"),
                [{"question": f"Q{i}?", "answer": f"A{i}\n#### {i}"} for i in range(8)])
    return str(d)


def request(task, data_dir):
    return B.FORMATS[task](B.load_docs(task, data_dir, hub=OfflineHub())[0])


def test_hellaswag_strings(data_dir):
    r = request("hellaswag", data_dir)
    assert r["contexts"][0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert r["continuations"][:2] == [" is using wrap. to wrap skis.", " is ripping tiles off."]
    assert r["choices"][1] == "is ripping tiles off." and r["gold"] == 3
    # the Hub layout: ctx_a + " " + ctx_b.capitalize(), brackets cleaned
    hub_doc = B.to_doc("hellaswag", {"activity_label": "Home [header] care", "ctx_a": "A man is sitting on a roof.",
                                     "ctx_b": "he", "endings": ["a", "b", "c", "d"], "label": "0"})
    assert B.fmt_hellaswag(hub_doc)["contexts"][0] == "Home care: A man is sitting on a roof. He"


def test_arc_piqa_obqa_mmlu_strings(data_dir):
    r = request("arc_easy", data_dir)
    assert r["contexts"] == ["Question: Which is a gas?\nAnswer:"] * 3
    assert r["continuations"] == [" ice", " steam", " rock"] and r["gold"] == 1  # numeric label "2", 3 choices
    r = request("piqa", data_dir)
    assert r["contexts"][0] == "Question: Open a jar\nAnswer:" and r["continuations"] == [" twist the lid", " eat the lid"]
    assert r["gold"] == 0
    r = request("openbookqa", data_dir)
    assert r["contexts"][0] == "Predators eat" and r["continuations"][2] == " bunnies" and r["gold"] == 2
    r = request("mmlu", data_dir)
    assert r["contexts"][0] == ("The following are multiple choice questions (with answers) about high school physics."
                                "\n\nWhat is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert r["continuations"] == [" A", " B", " C", " D"] and r["gold"] == 1


def test_limit_keeps_first_items_and_applies_to_each_mmlu_subject(tmp_path):
    """The harness's --limit keeps the first N docs of a task; MMLU is a group of subject tasks, so
    the limit applies to each subject (one Hub-style parquet file with the subjects interleaved)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    os.makedirs(tmp_path / "hub/cais/mmlu/all")
    rows = [{"question": f"{s} q{i}?", "subject": s, "choices": ["a", "b", "c", "d"], "answer": 0}
            for i in range(3) for s in ("virology", "anatomy")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub/cais/mmlu/all/test-00000-of-00001.parquet")
    hub = LocalHub(str(tmp_path / "hub"))
    cache = str(tmp_path / "cache")
    docs = B.load_docs("mmlu", str(tmp_path / "no_local"), cache_dir=cache, hub=hub, limit=2)
    assert [(d["subject"], d["question"]) for d in docs] == [
        ("anatomy", "anatomy q0?"), ("anatomy", "anatomy q1?"), ("virology", "virology q0?"), ("virology", "virology q1?")]
    assert len(B.load_docs("mmlu", str(tmp_path / "no_local"), cache_dir=cache, hub=hub)) == 6
    os.makedirs(tmp_path / "gsm8k")
    write_jsonl(str(tmp_path / "gsm8k/test.jsonl"), [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(5)])
    assert [d["question"] for d in B.load_docs("gsm8k", str(tmp_path), hub=OfflineHub(), limit=2)] == ["Q0?", "Q1?"]


def test_winogrande_and_lambada_strings(data_dir):
    r = request("winogrande", data_dir)
    assert r["contexts"] == ["Sarah was a better surgeon than Maria so Sarah",
                             "Sarah was a better surgeon than Maria so Maria"]
    assert r["continuations"] == [" got the harder cases."] * 2 and r["gold"] == 0
    r = request("lambada_openai", data_dir)
    assert r["contexts"] == ["He looked at the sky and saw the"] and r["continuations"] == [" moon"]


def test_gsm8k_fewshot_prompt_and_shots(data_dir):
    doc = {"question": "What is 2+3?", "answer": "#### 5"}
    shots = [{"question": "Q1?", "answer": "A1\n#### 1"}, {"question": "Q2?", "answer": "A2\n#### 2"}]
    assert B.gsm8k_fewshot_prompt(doc, shots) == ("Question: Q1?\nAnswer: A1\n#### 1\n\n"
                                                  "Question: Q2?\nAnswer: A2\n#### 2\n\n"
                                                  "Question: What is 2+3?\nAnswer:")
    train = list(range(20))
    rnd = random.Random(1234)  # the harness's sampler: one generator, sample(train, 5) per test item in order
    assert B.gsm8k_shots(3, train) == [rnd.sample(train, 5) for _ in range(3)]


def test_encode_pair_moves_trailing_space_and_splits_like_the_harness(tok):
    ctx, cont = B.encode_pair(tok, "Question: x\nAnswer: ", "steam", add_bos=True)
    assert ctx[0] == tok.bos_id and tok.decode(ctx[1:]) == "Question: x\nAnswer:"
    assert tok.decode(cont) == " steam"
    whole = tok.encode("Question: x\nAnswer: steam")
    assert ctx[1:] + cont == whole


# ---------------------------------------------------------------- batched == one forward per choice

@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "the a man sat on roof he she was better than so got harder cases question answer steam ice rock".split()
    docs = [" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(200)]
    return train_tokenizer(docs, 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                        max_seq_len=96))
    with torch.no_grad():  # larger weights than the init so log-likelihoods differ visibly between choices
        for p in m.parameters():
            p.mul_(8.0)
    return m.eval()


def random_requests(rng, n):
    words = "the man sat on roof he she was better than so got harder cases steam ice rock".split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    reqs = []
    for i in range(n):
        if i % 3 == 0:  # WinoGrande-style: a context per option, one shared continuation
            pre, rest = text(rng.randint(2, 12)), text(rng.randint(1, 8))
            reqs.append({"contexts": [pre + " " + text(1), pre + " " + text(2)], "continuations": [" " + rest] * 2,
                         "choices": ["a", "bb"], "gold": 0})
        else:
            k = rng.choice([2, 3, 4, 5])
            ch = [text(rng.randint(1, 6)) for _ in range(k)]
            reqs.append(B._mc(f"Question: {text(rng.randint(1, 40))}\nAnswer:", ch, 0))
    reqs.append(B._mc(text(150), ["steam", "ice"], 0))  # longer than max_seq_len: truncated on the left
    return reqs


def test_batched_scoring_equals_one_forward_per_choice(model, tok):
    reqs = random_requests(random.Random(), 12)
    ref = B.score_unbatched(model, tok, reqs)
    for budget in (300, 100000):  # many small batches, and everything in one
        got = B.score_items(model, tok, reqs, max_batch_tokens=budget, progress=False)
        for r_item, g_item in zip(ref, got):
            assert len(r_item) == len(g_item)
            for (lr, gr, nr), (lg, gg, ng) in zip(r_item, g_item):
                assert nr == ng and gr == gg
                assert lg == pytest.approx(lr, abs=2e-4, rel=1e-5)
    # the scores really discriminate between choices (a check that cannot pass with constant scores)
    assert len({round(s[0], 3) for item in ref for s in item}) > 15


def test_winogrande_partial_scoring_scores_only_the_shared_continuation(model, tok):
    req = B.fmt_winogrande({"sentence": "the man sat on _ so he got harder cases.", "option1": "roof",
                            "option2": "ice", "answer": "1"})
    (s1, _, n1), (s2, _, n2) = B.score_items(model, tok, [req], progress=False)[0]
    # independent computation: log p(" so he got harder cases." | bos + "the man sat on <option>")
    for option, got in (("roof", s1), ("ice", s2)):
        ctx = [tok.bos_id] + tok.encode(f"the man sat on {option}")
        whole = tok.encode(f"the man sat on {option} so he got harder cases.")
        cont = whole[len(ctx) - 1:]
        x = torch.tensor(ctx + cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None, :-1])[0].float(), -1)
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert got == pytest.approx(want, abs=2e-4)
    assert n1 == n2 == len(tok.encode(" so he got harder cases."))


# ---------------------------------------------------------------- metrics

def test_acc_and_acc_norm_disagree_on_a_constructed_item():
    req = {"choices": ["no", "a much longer answer"], "gold": 1}
    # sums: -2 vs -6 (acc picks 0); per character: -1.0 vs -0.3 (acc_norm picks 1)
    m = B.mc_metrics(req, [(-2.0, False, 1), (-6.0, False, 4)])
    assert (m["acc"], m["acc_norm"], m["pred"], m["pred_norm"]) == (0.0, 1.0, 0, 1)


@pytest.mark.parametrize("text,strict,flexible", [
    ("She sells 9 eggs for $2 each: 9 * 2 = $18.\n#### 18", "18", "18"),
    ("#### 1,000\nand later 7", "1000", "7"),                    # flexible takes the LAST number
    ("The answer is $1,234.50.", None, "1234.50"),              # '$', ',' and the final '.' dropped
    ("#### 5 #### 6", "5", "6"),                                # strict takes the FIRST ####
    ("Total: -3 degrees.", None, "-3"),
    ("#### -0.5.", "-0.5", "-0.5"),
    ("no digits here", None, None),
    ("It is 8", None, "8"),                                     # single digit: the (-?[0-9]+) branch
])
def test_gsm8k_strict_vs_flexible(text, strict, flexible):
    assert tasks.extract_answer(text, "strict") == strict
    assert tasks.extract_answer(text, "flexible") == flexible


def test_pass_at_k_matches_hand_computation():
    assert B.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)      # 1 - C(3,2)/C(5,2)
    assert B.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert B.pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)   # 1 - C(7,4)/C(10,4)
    assert B.pass_at_k(4, 0, 2) == 0.0 and B.pass_at_k(4, 3, 2) == 1.0
    for n, c, k in [(20, 7, 5), (100, 1, 10)]:
        assert B.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


# ---------------------------------------------------------------- data: download (hub_standin.LocalHub), bad input

def test_download_from_hub_layout_when_not_local(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    repo = tmp_path / "hub/allenai/ai2_arc/ARC-Challenge"
    os.makedirs(repo)
    pq.write_table(pa.Table.from_pylist([{"id": "x", "question": "Which is hot?", "answerKey": "B",
                                          "choices": {"text": ["ice", "fire"], "label": ["A", "B"]}}]),
                   str(repo / "test-00000-of-00001.parquet"))
    hub = LocalHub(str(tmp_path / "hub"))
    cache = str(tmp_path / "cache")
    docs = B.load_docs("arc_challenge", str(tmp_path / "empty"), cache, hub)
    assert B.fmt_arc(docs[0])["contexts"][0] == "Question: Which is hot?\nAnswer:" and B.fmt_arc(docs[0])["gold"] == 1
    B.load_docs("arc_challenge", str(tmp_path / "empty"), cache, hub)
    assert len(hub.downloads) == 1  # cached: the second read downloads nothing


def test_bad_input_one_clear_line_each(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit, match="unknown task 'hellaswagg'.*Known tasks"):
        B.parse_tasks("l20,hellaswagg")
    with pytest.raises(SystemExit, match="eval set piqa: no piqa/valid.jsonl under .* Hub is unreachable"):
        B.load_docs("piqa", str(tmp_path / "nowhere"), hub=OfflineHub())
    path = os.path.join(data_dir, "winogrande/dev.jsonl")
    with open(path, "a") as f:
        f.write('{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}\n{not json\n')
        f.write('{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "2"}\n')
    lines = []
    docs = B.load_docs("winogrande", data_dir, hub=OfflineHub(), log=lines.append)
    assert len(docs) == 2  # two good rows scored, two bad ones skipped
    assert len(lines) == 1 and "skipped 2 malformed row(s) of 4" in lines[0] and "dev.jsonl:2" in lines[0]


def test_table_and_run_tasks_end_to_end(model, tok, data_dir):
    names, sets = B.parse_tasks("l20,lambada_openai,mmlu,gsm8k")
    assert names[:6] == B.TASK_SETS["l20"] and sets == {"l20": B.TASK_SETS["l20"]}
    tok.end_id  # chat stop token exists
    metrics, items = B.run_tasks(model, tok, names, fmt="plain", data_dir=data_dir, hub=OfflineHub(),
                                 gsm8k_opts={"max_new_tokens": 8, "n_samples": 2, "k_list": [1, 2]},
                                 progress=False, log=lambda *_: None)
    assert set(metrics) == set(names)
    assert len(items["piqa"]) == 2 and len(items["piqa"][0]["scores"]) == 2
    assert metrics["gsm8k"]["n"] == 1 and "pass@2" in metrics["gsm8k"] and "mean@2" in metrics["gsm8k"]
    table = B.format_table([{"name": "ckpt_a", "metrics": metrics}], names, sets)
    head, _, row = table.splitlines()
    assert head.startswith("| checkpoint | hellaswag (acc_norm) |") and "| l20 (mean) | mean |" in head
    cells = [float(c) for c in row.split("|")[2:-1]]
    l20 = sum(metrics[t][B.HEADLINE[t]] for t in B.TASK_SETS["l20"]) / 6
    assert cells[names.index("piqa")] == pytest.approx(metrics["piqa"]["acc_norm"], abs=1e-4)
    assert cells[-2] == pytest.approx(l20, abs=1e-4)


def test_report_shows_the_benchmark_table(tmp_path):
    import report
    table = "| checkpoint | piqa (acc_norm) | mean |\n|---|---:|---:|\n| out/x | 0.6123 | 0.6123 |\n"
    (tmp_path / "eval_benchmarks.md").write_text(table)
    report.main(report.ReportConfig(out_dir=str(tmp_path)))
    assert table in (tmp_path / "report.md").read_text()


def test_eval_cli_one_table_across_checkpoints_and_per_item_json(model, tok, data_dir, tmp_path, capsys):
    import eval as ev
    from dataclasses import dataclass
    from common import save_checkpoint

    @dataclass
    class Cfg:
        note: str = "test"

    for name, fmt in (("a", "plain"), ("b", "chat")):
        save_checkpoint(str(tmp_path / name), stage="pretrain", step=0, model=model, tok=tok, train_cfg=Cfg(),
                        extra={"fmt": fmt})
    out = str(tmp_path / "res" / "eval")
    cfg = ev.EvalConfig(ckpts=f"{tmp_path / 'a'},{tmp_path / 'b'}", tasks="piqa,winogrande,gsm8k",
                        benchmark_dir=data_dir, hf_cache=str(tmp_path / "cache"), gsm8k_max_new_tokens=8, out=out)
    ev.main(cfg)
    md = open(out + "_benchmarks.md").read()
    assert md in capsys.readouterr().out
    assert len(md.strip().splitlines()) == 4  # header, rule, one row per checkpoint
    res = json.load(open(out + "_benchmarks.json"))
    assert [r["gsm8k_format"] for r in res["rows"]] == ["plain", "chat"]
    for path in (str(tmp_path / "a"), str(tmp_path / "b")):
        piqa = res["items"][path]["piqa"]
        assert len(piqa) == 2 and all(len(it["scores"]) == 2 and it["pred"] in (0, 1) for it in piqa)
        assert "completion" in res["items"][path]["gsm8k"][0]
    with pytest.raises(SystemExit, match="unknown task"):
        ev.main(ev.EvalConfig(ckpts=str(tmp_path / "a"), tasks="gsm9k", out=out))


def test_bench_linear_macs_counts_the_shared_context_once_and_the_output_layer_at_scored_positions():
    """bench/benchmarks.py's linear-layer work of both paths, against a hand count on a character-level
    tokenizer: trunk = 2 layers x (q 16x16 + k, v 16x8 each + o 16x16 + gate, up, down 16x32 each)
    = 2 x 2304 = 4608 per token, output layer 40 x 16 = 640 per scored token."""
    from bench.benchmarks import linear_macs

    class Chars:
        bos_id = 0

        @staticmethod
        def encode(text):
            return [1 + ord(c) % 39 for c in text]

    model = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=64))
    req = {"contexts": ["abcd", "abcd"], "continuations": ["xyz", "w"]}  # bos + 4 context chars; 3 and 1 to score
    plain, batched = linear_macs(model, Chars, [req])
    # one forward per choice: inputs are bos+abcd+xy (7) and bos+abcd (5), every position through both
    assert plain == (7 + 5) * (4608 + 640)
    # packed: the shared inputs bos+abcd (5) once, then x, y of the first branch (2); 3 + 1 scored positions
    assert batched == (5 + 2) * 4608 + (3 + 1) * 640
