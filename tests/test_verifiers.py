"""verifiers.py: the sandbox as an attacker would try it, scoring of correct and wrong programs, math /
GSM8K / logic / instruction checks, the row format and the Hub loaders (on files written here)."""
import dataclasses
import json
import os
import random
import socket
import threading
from fractions import Fraction

import pytest

import verifiers as V
from hub_standin import LocalHub

# Tight limits: a sandbox failure must not take down a machine shared by several people. Programs that end
# by themselves get a roomy wall clock (a loaded machine starts python slowly); only those that never end
# (sleep, fork bomb) run into the short one.
TIGHT = V.SandboxLimits(timeout=2.0, memory_mb=256, fsize_mb=1, nproc=8, max_output=64 << 10)
ROOMY = dataclasses.replace(TIGHT, timeout=30.0)


def _iso():
    try:
        return V.isolation("auto")
    except V.SandboxUnavailable as e:
        pytest.skip(f"no sandbox isolation on this machine: {e}")


def _procs_running(marker):
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    n += marker.encode() in f.read()
            except OSError:
                pass
    return n


def test_attacks_contained_and_reported(tmp_path, monkeypatch):
    iso = _iso()
    tag = f"nf{random.randrange(10**9)}"
    monkeypatch.setenv("NANOFORGE_TEST_SECRET", tag + "secret")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    outside = tmp_path / "outside.txt"
    me = os.getpid()
    attacks = {
        "socket": f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                  f"    print('CONNECTED')\nexcept OSError as e:\n    print('refused', e)",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(10**8))",
        "huge_file": "with open('big.bin', 'wb') as f:\n    for _ in range(100):\n        f.write(bytes(1 << 20))",
        "sleep": "import time\ntime.sleep(10**6)",
        "secrets": f"import os, glob\nprint(dict(os.environ))\nfor p in glob.glob('/proc/*/environ'):\n"
                   f"    try:\n        print(open(p).read())\n    except OSError:\n        pass\n"
                   f"try:\n    print(open('/proc/{me}/environ').read())\nexcept OSError as e:\n    print('denied', e)",
        "write_outside": f"import os\nfor p in [{str(outside)!r}, {os.path.join(os.getcwd(), tag)!r}, "
                         f"'/tmp/{tag}']:\n    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
                         f"    except OSError as e:\n        print('denied', p, e)",
        "kill_parent": f"import os, signal\nfor pid in (os.getppid(), {me}):\n    try:\n"
                       f"        os.kill(pid, signal.SIGKILL); print('KILLED', pid)\n"
                       f"    except OSError as e:\n        print('denied', pid, e)",
        "print_gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    }
    names = list(attacks)
    made = []
    real_mkdtemp = V.tempfile.mkdtemp
    monkeypatch.setattr(V.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    jobs = [({f"{tag}_{n}.py": attacks[n]}, ["python", "-I", f"{tag}_{n}.py"]) for n in names]
    ending = [n for n in names if n not in ("sleep", "fork_bomb")]
    res = dict(zip(ending, V.run_programs([jobs[names.index(n)] for n in ending], workers=len(jobs), limits=ROOMY)))
    res["sleep"] = V.run_program(*jobs[names.index("sleep")], limits=TIGHT)
    # the fork bomb alone, after the others: its spinning processes would starve them of the 2 cores
    res["fork_bomb"] = V.run_program(*jobs[names.index("fork_bomb")], limits=TIGHT)
    try:
        server.accept()
        accepted = True
    except BlockingIOError:
        accepted = False
    server.close()

    assert not accepted and "CONNECTED" not in res["socket"].stdout and "refused" in res["socket"].stdout
    assert res["fork_bomb"].status == "timeout"
    assert res["memory_bomb"].status != "ok" and "MemoryError" in res["memory_bomb"].stderr + res["memory_bomb"].status
    assert res["huge_file"].status in ("killed:SIGXFSZ", "error"), res["huge_file"]
    assert res["sleep"].status == "timeout" and res["sleep"].seconds < TIGHT.timeout + 10
    assert tag + "secret" not in res["secrets"].stdout and "denied" in res["secrets"].stdout
    wrote = res["write_outside"].stdout
    assert f"WROTE {outside}" not in wrote and not outside.exists()
    assert "WROTE " + os.path.join(os.getcwd(), tag) not in wrote and not os.path.exists(os.path.join(os.getcwd(), tag))
    if iso == "bwrap":  # a private /tmp: nothing reaches the real one
        assert not os.path.exists(f"/tmp/{tag}")
    elif os.path.exists(f"/tmp/{tag}"):  # unshare: world-writable dirs stay writable (documented)
        os.remove(f"/tmp/{tag}")
    assert "KILLED" not in res["kill_parent"].stdout and res["kill_parent"].stdout.count("denied") == 2
    assert res["print_gigabytes"].status == "output_limit" and len(res["print_gigabytes"].stdout) <= TIGHT.max_output
    # nothing left behind: no process of any attack, no working directory
    assert _procs_running(tag) == 0
    assert len(made) == len(jobs) and not [d for d in made if os.path.exists(d)]


def test_reward_is_fraction_of_tests_passed():
    _iso()
    rng = random.Random()
    a, b, cut = rng.randint(2, 9), rng.randint(-9, 9), rng.randint(0, 10)
    xs = rng.sample(range(-20, 21), 8)
    asserts = [f"assert f({x}) == {a * x + b}" for x in xs]
    correct = f"Here you go:\n```python\ndef f(x):\n    return {a} * x + {b}\n```"
    buggy = f"```python\ndef f(x):\n    return {a} * x + {b} if x < {cut} else 0\n```"
    expect_buggy = sum((a * x + b if x < cut else 0) == a * x + b for x in xs) / len(xs)
    stdin_tests = {"type": "stdin_stdout", "inputs": [f"{x}\n" for x in xs], "outputs": [f"{a * x + b}\n" for x in xs]}
    call_tests = {"type": "call", "fn_name": "f", "inputs": [[x] for x in xs], "outputs": [a * x + b for x in xs]}
    rows = [{"kind": "code", "prompt": "p", "tests": {"type": "assert", "asserts": asserts}}] * 5 + \
           [{"kind": "code", "prompt": "p", "tests": stdin_tests}] * 2 + [{"kind": "code", "prompt": "p", "tests": call_tests}]
    comps = [correct, buggy, "```python\ndef f(x) return x\n```", "```python\nraise SystemExit(3)\n```",
             "```python\nimport os\nos._exit(0)\n```",
             f"x = int(input())\nprint({a} * x + {b})", f"x = int(input())\nprint({a} * x + {b} if x < {cut} else 0)",
             buggy]
    got = V.score_batch(rows, comps, limits=ROOMY)
    assert got == pytest.approx([1.0, expect_buggy, 0.0, 0.0, 0.0, 1.0, expect_buggy, expect_buggy])
    hang = V.score(rows[0], "```python\nimport time\ntime.sleep(100)\ndef f(x):\n    return 0\n```", limits=TIGHT)
    assert hang == 0.0  # timeout: 0 whatever passed


def test_run_programs_parallel_in_order():
    _iso()
    vals = [random.randrange(10**6) for _ in range(6)]
    res = V.run_programs([({"m.py": f"print({v} * 3)"}, ["python", "-I", "m.py"]) for v in vals], workers=3,
                         limits=ROOMY)
    assert [r.stdout.strip() for r in res] == [str(v * 3) for v in vals] and all(r.status == "ok" for r in res)


def test_refuses_without_isolation_unless_accepted(monkeypatch, capsys):
    monkeypatch.setattr(V, "_ISOLATION", {})
    monkeypatch.setattr(V, "_WARNED", set())
    real_which = V.shutil.which
    monkeypatch.setattr(V.shutil, "which", lambda n: None if n in ("bwrap", "unshare") else real_which(n))
    with pytest.raises(V.SandboxUnavailable, match="refusing.*--sandbox=none"):
        V.isolation("auto")
    with pytest.raises(V.SandboxUnavailable):
        V.run_program({"m.py": "print(1)"}, ["python", "m.py"])
    assert V.isolation("none") == "none"
    assert V.isolation("none") == "none"
    assert capsys.readouterr().err.count("isolation=none accepted") == 1  # said once
    r = V.run_program({"m.py": "print(6 * 7)"}, ["python", "-I", "m.py"], ROOMY, isolation_mode="none")
    assert r.stdout.strip() == "42"


def test_code_output_rows_match_the_sandbox():
    """The embedded second kind: each generated program's target equals what the sandbox sees it print."""
    _iso()
    import tasks
    rows = tasks.make_code_split(12, seed=random.randrange(1000), split="heldout")
    printed = V.program_outputs([r["code"] for r in rows], limits=ROOMY)
    assert [int(p) for p in printed] == [r["target"] for r in rows]
    assert all(V.score(r, f"... \n#### {r['target']}") == 1.0 for r in rows)
    assert all(V.score(r, f"#### {r['target'] + 1}") == 0.0 for r in rows)


def test_math_verify_order_equivalence_and_threads():
    pytest.importorskip("math_verify")
    rng = random.Random()
    for _ in range(4):
        p, q = rng.randint(1, 40), rng.randint(2, 40)
        f = Fraction(p, q)
        gold = f"\\frac{{{p}}}{{{q}}}"
        same = f"The answer is $\\boxed{{\\frac{{{2 * p}}}{{{2 * q}}}}}$."
        other = Fraction(p + 1, q)
        diff = f"so \\boxed{{\\frac{{{other.numerator}}}{{{other.denominator}}}}}"
        assert V.math_reward(same, gold) == 1.0
        assert V.math_reward(diff, gold) == float(other == f)
    assert V.math_reward("no box here, 7", "7") == 0.0
    assert V.math_reward("\\boxed{3}", "") is None  # gold that cannot be parsed: skip
    out = []
    t = threading.Thread(target=lambda: out.append(V.math_reward("\\boxed{0.5}", "\\frac{1}{2}")))
    t.start()
    t.join()
    assert out == [1.0]


def test_gsm8k_rows_use_the_shared_extractor():
    n = random.randint(100, 99999)
    row = {"question": "q", "answer": f"some steps\n#### {n:,}"}
    assert V.score(row, f"so it is\n#### {n}") == 1.0
    assert V.score(row, f"#### {n + 1}") == 0.0
    assert V.score({"prompt": "q", "kind": "gsm8k", "target": n}, f"#### {n:,}.") == 1.0
    # lm-evaluation-harness's strict-match (tasks.extract_answer): no '$' after '#### ', no numeric canonicalisation
    assert V.score({"prompt": "q", "kind": "gsm8k", "target": n}, f"#### ${n:,}.00") == 0.0


def test_logic_rows_scored_by_reasoning_gym():
    pytest.importorskip("reasoning_gym")
    rows = V.make_logic_rows(["chain_sum", "leg_counting"], 3, seed=random.randrange(1000))
    assert len(rows) == 6 and all(V.check_row(r) is None for r in rows)
    rows = [json.loads(json.dumps(r)) for r in rows]  # as read back from a .jsonl
    for r in rows:
        ans = r["entry"]["answer"]
        assert V.score(r, f"thinking...</think><answer>{ans}</answer>") == 1.0
        assert V.score(r, f"<answer>{int(ans) + 1}</answer>") < 1.0
        assert V.score(r, f"the answer is {ans}") == 0.0  # no tags


def test_ifeval_checks():
    ins = [{"id": "length_constraints:number_words", "num_words": 5, "relation": "at least"},
           {"id": "punctuation:no_comma"}, {"id": "keywords:existence", "keywords": ["llama"]},
           {"id": "change_case:english_lowercase"}]
    row = {"prompt": "p", "kind": "ifeval", "instructions": ins}
    assert V.score(row, "<think>Ignore, THIS</think>the llama walks up the hill") == 1.0
    assert V.score(row, "the Llama walks, up the hill") == pytest.approx(2 / 4)
    assert V.ifeval_reward('{"a": [1, 2]}', [{"id": "detectable_format:json_format"}]) == 1.0
    assert V.ifeval_reward("{'a': 1}", [{"id": "detectable_format:json_format"}]) == 0.0
    assert V.ifeval_reward("* a\n* b\n- c", [{"id": "detectable_format:number_bullet_lists", "num_bullets": 3}]) == 1.0
    assert V.ifeval_reward("Bye. Is there anything else I can help with?",
                           [{"id": "startend:end_checker", "end_phrase": "Is there anything else I can help with?"}]) == 1.0
    assert V.ifeval_reward("a b c", [{"id": "length_constraints:number_words", "num_words": 3,
                                      "relation": "less than"}]) == 0.0


# (instruction id, kwargs, response, followed?) -- expected values worked out by hand from the rules in
# lm-evaluation-harness's lm_eval/tasks/ifeval/instructions.py (strict check).
IFEVAL_CASES = [
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "Cat and CAT.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "cat, cat", False),
    ("keywords:forbidden_words", {"forbidden_words": ["dog"]}, "Dogs are fine.", True),  # whole words only
    ("keywords:forbidden_words", {"forbidden_words": ["dog"]}, "A DOG.", False),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": "at least"}, "Eve ate", True),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": "less than"}, "Eve ate", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "One. Two!", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo\n***\n", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one *** *** two", False),  # empty one inside
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "hello"},
     "Hi.\n\n\"Hello, there\"", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "hello"},
     "Hi.\n\nHello", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\np.s. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body. P.S. only one", False),
    ("detectable_content:postscript", {"postscript_marker": " P.P.S "}, "Body.\nP.P.S. later", True),  # stripped
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\n**bold** line", True),
    ("detectable_format:constrained_response", {}, "Well... My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "My answer is perhaps.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and * *", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1 only", False),
    ("detectable_format:json_format", {}, '```JSON\n{"a": 1}\n```', True),
    ("detectable_format:title", {}, "<<  >> no title", False),
    ("combination:two_responses", {}, "Yes.\n******\nNo.", True),
    ("combination:two_responses", {}, "Yes.\n******\nYes.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say HI. Hi!", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi!", False),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, '"Done. Any questions?"', True),
    ("startend:quotation", {}, '"quoted"', True),
    ("startend:quotation", {}, '"', False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "USE CAPS-LOCK sometimes", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "NO NO", False),
    ("change_case:english_capital", {}, "ALL CAPS, 100%", True),
    ("change_case:english_capital", {}, "123", False),  # no cased letter: str.isupper is False
    ("punctuation:no_comma", {}, "", False),  # an empty response follows nothing
]


@pytest.mark.parametrize("iid,kwargs,text,want", IFEVAL_CASES)
def test_ifeval_check_against_hand_worked_cases(iid, kwargs, text, want):
    assert V.ifeval_reward(text, [{"id": iid, **kwargs}]) == float(want)


def test_ifeval_checks_cover_all_but_the_language_instruction():
    harness_ids = {  # lm_eval/tasks/ifeval/instructions_registry.py INSTRUCTION_DICT
        "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
        "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
        "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
        "detectable_content:number_placeholders", "detectable_content:postscript",
        "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
        "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
        "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
        "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
        "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma", "startend:quotation"}
    assert set(V.IFEVAL_CHECKS) == harness_ids - {"language:response_language"}
    # after '</think>' the separating whitespace goes, so the first paragraph is the answer's first one
    first = [{"id": "length_constraints:nth_paragraph_first_word", "num_paragraphs": 1, "nth_paragraph": 1,
              "first_word": "yes"}]
    assert V.ifeval_reward("<think>hm</think>\n\nYes, I can.", first) == 1.0
    assert V.ifeval_reward("\n\nYes, I can.", first) == 0.0  # no thinking: taken as generated (paragraph 1 empty)


def test_ifeval_checks_match_the_harness_on_random_responses(monkeypatch):
    """Where lm-evaluation-harness is installed: every check but the three that need nltk's punkt or
    langdetect's models agrees with the harness's own check_following on random responses built from
    the pieces the checks look for."""
    H = pytest.importorskip("lm_eval.tasks.ifeval.instructions")
    registry = pytest.importorskip("lm_eval.tasks.ifeval.instructions_registry").INSTRUCTION_DICT
    monkeypatch.setattr(H.langdetect, "detect", lambda text: "en")  # case checks only: see IFEVAL_CHECKS' comment
    seed = random.randrange(1 << 30)  # fresh inputs each run; a failure names its seed
    rng = random.Random(seed)
    pieces = ["the", "The", "cat", "CAT", ",", ".", "!", "?", " ", " ", "\n", "\n\n", "***", " *** ", "*", "**",
              "*hi*", "**bold**", "* item", "- item", "[name]", "<<Title>>", "<< >>", "P.S.", "p.s. more", "P.P.S",
              "Section 1", "SECTION 2", "******", '"', "My answer is yes.", '{"a": 1}', "```json", "```", "'",
              "Dear", "dear,", "e", "z", "llama", "repeat me"]
    rel = ["less than", "at least"]
    kwargs = {
        "keywords:existence": lambda: {"keywords": rng.sample(["cat", "llama", "the"], 2)},
        "keywords:frequency": lambda: {"keyword": "cat", "frequency": rng.randint(1, 3), "relation": rng.choice(rel)},
        "keywords:forbidden_words": lambda: {"forbidden_words": rng.sample(["cat", "llama", "dear"], 2)},
        "keywords:letter_frequency": lambda: {"letter": rng.choice("etz"), "let_frequency": rng.randint(1, 6),
                                              "let_relation": rng.choice(rel)},
        "length_constraints:number_paragraphs": lambda: {"num_paragraphs": rng.randint(1, 4)},
        "length_constraints:number_words": lambda: {"num_words": rng.randint(1, 12), "relation": rng.choice(rel)},
        "length_constraints:nth_paragraph_first_word": lambda: {"num_paragraphs": 2, "nth_paragraph": rng.randint(1, 2),
                                                                "first_word": rng.choice(["the", "dear"])},
        "detectable_content:number_placeholders": lambda: {"num_placeholders": rng.randint(1, 3)},
        "detectable_content:postscript": lambda: {"postscript_marker": rng.choice(["P.S.", "P.P.S", " P.P.S "])},
        "detectable_format:number_bullet_lists": lambda: {"num_bullets": rng.randint(0, 3)},
        "detectable_format:number_highlighted_sections": lambda: {"num_highlights": rng.randint(1, 3)},
        "detectable_format:multiple_sections": lambda: {"section_spliter": rng.choice(["Section", "SECTION"]),
                                                        "num_sections": rng.randint(1, 3)},
        "combination:repeat_prompt": lambda: {"prompt_to_repeat": rng.choice(["repeat me", "The cat"])},
        "startend:end_checker": lambda: {"end_phrase": rng.choice(["cat", "the cat."])},
    }
    ids = sorted(set(V.IFEVAL_CHECKS) - {"length_constraints:number_sentences", "change_case:capital_word_frequency"})
    followed = 0
    for _ in range(4000):
        iid = rng.choice(ids)
        kw = kwargs.get(iid, dict)()
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        ref = registry[iid](iid)
        ref.build_description(**kw)
        want = bool(text.strip()) and bool(ref.check_following(text))  # evaluation_lib's strict rule
        assert V.ifeval_reward(text, [{"id": iid, **kw}]) == float(want), (seed, iid, kw, text)
        followed += want
    assert 0 < followed < 4000


def test_row_format_errors_and_prompts():
    assert V.check_row({"prompt": "p", "kind": "poetry"}).startswith("unknown kind")
    assert "needs 'gold'" in V.check_row({"prompt": "p", "kind": "math"})
    assert "no prompt" in V.check_row({"kind": "math", "gold": "1"})
    assert "unsupported IFEval" in V.check_row({"prompt": "p", "kind": "ifeval", "instructions": [{"id": "x:y"}]})
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert V.prompt_text({"messages": msgs}) == "Be brief.\n\n2+2?"
    with pytest.raises(SystemExit, match="rows.jsonl row 2: unknown kind"):
        V.check_rows([{"question": "q", "target": 1}, {"prompt": "p", "kind": "nope"}], "rows.jsonl")


def test_hub_loaders_on_fake_hub(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    _iso()
    hub = LocalHub(str(tmp_path / "hub"))

    def put(repo, name, rows):
        path = tmp_path / "hub" / repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        elif name.endswith(".json"):
            path.write_text(json.dumps(rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    n = random.randint(2, 50)
    put("agentica-org/DeepScaleR-Preview-Dataset", "deepscaler.json",
        [{"problem": "What is 1/2 + 1/2?", "answer": "1", "solution": "..."}])
    put("openai/gsm8k", "main/train-00000-of-00001.parquet", [{"question": "q?", "answer": f"x\n#### {n}"}])
    code_gt = json.dumps({"inputs": ["2\n", "5\n"], "outputs": ["4\n", "25\n"]})
    user = [{"role": "user", "content": "Square the input."}]
    put("PRIME-RL/Eurus-2-RL-Data", "train.parquet", [
        {"data_source": "taco", "prompt": user, "ability": "code",
         "reward_model": {"style": "rule", "ground_truth": code_gt}, "extra_info": {"index": 0}},
        {"data_source": "numina", "prompt": user, "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "\\frac{3}{4}"}, "extra_info": {"index": 1}}])
    put("google/IFEval", "ifeval_input_data.jsonl", [
        {"key": 1, "prompt": "Write in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Unsupported.", "instruction_id_list": ["language:response_language"],
         "kwargs": [{"language": "fr"}]}])
    put("nvidia/Llama-Nemotron-Post-Training-Dataset", "RL/instruction_following/instruction_following.jsonl", [
        {"input": [{"role": "user", "content": "Explain rain. Include a postscript starting with P.S."}],
         "args": {"instruction_id_list": ["detectable_content:postscript", "length_constraints:number_words"],
                  "instruction_kwargs": [{"postscript_marker": "P.S.", "num_words": None},
                                         {"postscript_marker": None, "num_words": 4, "relation": "at least"}],
                  "task": "instruction_following"},
         "category": "instruction_following", "license": "odc-by", "reasoning": "off",
         "used_in_training": "Ultra, Super", "version": "v1", "system_prompt": "detailed thinking off"},
        {"input": [{"role": "user", "content": "Reply in French."}],
         "args": {"instruction_id_list": ["language:response_language"], "instruction_kwargs": [{"language": "fr"}]},
         "category": "instruction_following", "system_prompt": "detailed thinking off"},
        {"input": [{"role": "user", "content": "Mismatched args."}],
         "args": {"instruction_id_list": ["punctuation:no_comma"], "instruction_kwargs": []}}])
    nif, nif_skipped = V.load_hub_rows("nemotron_if", str(tmp_path / "cache"), hub=hub)
    assert nif_skipped == 2 and len(nif) == 1 and V.prompt_text(nif[0]).startswith("Explain rain.")
    assert nif[0]["instructions"] == [{"id": "detectable_content:postscript", "postscript_marker": "P.S."},
                                      {"id": "length_constraints:number_words", "num_words": 4, "relation": "at least"}]
    assert V.score_batch(nif * 3, ["Rain falls from clouds.\nP.S. bring an umbrella", "Rain falls from clouds.",
                                   "P.S. wet"]) == [1.0, 0.5, 0.5]
    put("EricLu/SCP-116K", "data/train-00000.parquet", [
        {"domain": "physics", "problem": "A car goes 100 m in 20 s. Its speed in m/s?", "matched_solution": "5 m/s",
         "o1_solution": "speed = 100/20 = \\boxed{5}", "is_o1_solution_same_with_matched_solution": True},
        {"domain": "physics", "problem": "Disagreeing solutions.", "matched_solution": "3",
         "o1_solution": "\\boxed{4}", "is_o1_solution_same_with_matched_solution": False},
        {"domain": "biology", "problem": "No boxed answer.", "matched_solution": "x",
         "o1_solution": "it is x", "is_o1_solution_same_with_matched_solution": True}])
    cache = str(tmp_path / "cache")
    scp, scp_skipped = V.load_hub_rows("scp116k", cache, hub=hub)
    assert len(scp) == 1 and scp_skipped == 2 and scp[0]["gold"] == "\\boxed{5}"
    assert V.score_batch(scp * 2, ["so \\boxed{5}", "so \\boxed{6}"], limits=ROOMY) == [1.0, 0.0]
    ds, _ = V.load_hub_rows("deepscaler", cache, hub=hub)
    gs, _ = V.load_hub_rows("gsm8k", cache, hub=hub)
    eu, _ = V.load_hub_rows("eurus2_rl", cache, hub=hub)
    ie, skipped = V.load_hub_rows("ifeval", cache, hub=hub)
    assert [r["kind"] for r in ds + gs + eu + ie] == ["math", "gsm8k", "code", "math", "ifeval"] and skipped == 1
    assert "\\boxed{}" in V.prompt_text(ds[0]) and V.prompt_text(eu[0]) == "Square the input."
    comps = ["\\boxed{1}", f"#### {n}", "```python\nx = int(input())\nprint(x * x)\n```", "\\boxed{0.75}", "all lower"]
    assert V.score_batch(ds + gs + eu + ie, comps, limits=ROOMY) == [1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(SystemExit, match="unknown RL dataset"):
        V.load_hub_rows("nope", cache, hub=hub)


def test_eval_reports_pass1_per_kind(tmp_path):
    """Held-out rows of two kinds (tasks.py --code_share): eval.py scores each by its verifier and reports
    pass@1 per kind, consistent with the overall pass@1."""
    _iso()
    import common
    import eval as evaluate
    import tasks
    from model import GPT, model_config
    from tokenizer import load_tokenizer
    d = tmp_path / "data"
    tasks.main(tasks.TasksConfig(out_dir=str(d), n_pretrain=200, n_val=20, n_sft=16, n_rl=16, n_heldout=12,
                                 vocab_size=300, code_share=0.5))
    held = [json.loads(l) for l in open(d / "heldout.jsonl")]
    assert sum(V.kind_of(r) == "code_output" for r in held) == 6 and all(V.check_row(r) is None for r in held)
    tok = load_tokenizer(str(d / "tokenizer.json"))
    model = GPT(model_config("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, d_ff=64))
    common.save_checkpoint(str(tmp_path / "sft"), stage="sft", step=0, model=model, tok=tok,
                           train_cfg=tasks.TasksConfig(), extra={"fmt": "chat"})
    res = evaluate.main(evaluate.EvalConfig(ckpts=str(tmp_path / "sft"), data_dir=str(d), n_heldout=12, k=0,
                                            max_new_tokens=8, out=str(tmp_path / "eval"), device="cpu",
                                            kernels="torch"))[0]
    assert res["pass@1"] == pytest.approx((res["pass@1/gsm8k"] + res["pass@1/code_output"]) / 2)
    table = open(str(tmp_path / "eval") + ".md").read()
    assert "pass@1/code_output (%)" in table and "pass@0" not in table


def test_score_examples_scores_a_chat_row_by_its_normalized_target(tmp_path):
    """A held-out `messages` row has its answer in the last assistant turn, not in 'target'/'answer': the
    one scorer of GRPO and eval reads the normalized example (scoring its raw row would not find a target)."""
    from tasks import load_examples
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "2+2=4\n#### 4"}]}) + "\n")
    exs = load_examples(str(path), "target", "held-out")
    assert V.score_examples(exs * 3, ["so #### 4", "#### 5", "4"]) == [1.0, 0.0, 0.0]
    assert V.score_examples(exs, ["so 4"], answer_match="flexible") == [1.0]
