"""
Verifiable rewards for RL, by task kind: a sandboxed code runner, math / logic / instruction checks,
and one row format for RL prompts of any kind (ProRL, arXiv 2505.24864 App. D: math, code, STEM,
logic puzzles, instruction following, mixed in one run).

The row format (one JSON object per prompt, in any .jsonl the RL and eval stages read):

    what the model sees  "prompt": str   or   "messages": [{"role": "system"|"user", "content": str}, ...]
                         ("question": str, the embedded task's and GSM8K's key, is read as "prompt")
    which verifier       "kind": one of KINDS below (a row without "kind" is a "gsm8k" row)
    verifier arguments, by kind:
      gsm8k        "target": number, or "answer": GSM8K solution text ending '#### N'. The completion's
                   number after '####' must equal it (tasks.extract_answer, the one shared extractor). Binary.
      math         "gold": the reference answer (LaTeX or plain, e.g. "\\frac{1}{2}"). The completion's
                   \\boxed{} answer is checked with math-verify, verify(gold, prediction) in that order.
                   Binary; None (skip: the trainer gives the group no signal) when the gold cannot be parsed.
      code         "tests": {"type": "assert", "asserts": [python statements]}
                          | {"type": "stdin_stdout", "inputs": [str], "outputs": [str]}
                          | {"type": "call", "fn_name": str, "inputs": [[args]], "outputs": [value]}
                   The program is the completion's last ```python block (the whole text when there is none,
                   as verl's prime_code does); it runs in the sandbox. Reward = fraction of tests passed;
                   compile error, timeout or a crash of the process gives 0 (ProRL). Continuous.
      code_output  "code": a program. The completion's number after '####' must equal what the program
                   prints when run in the sandbox (the embedded second task kind, tasks.py). Binary.
      logic        "dataset": a reasoning-gym generator name, "entry": the generated entry. Scored by
                   reasoning-gym's own score_answer on the completion's <answer>...</answer> (ProRL).
                   Continuous in [0, 1].
      ifeval       "instructions": [{"id": IFEval instruction id, **its kwargs}]. Checked on the text after
                   '</think>' when there is one. Reward = fraction of instructions followed. Continuous.

Where an option deviates from its source, the docstring says so. Rewards are floats in [0, 1]
(or None: skip); "accuracy" in logs counts a completion as correct when its reward is >= 0.99
(open-r1's binary_code_reward threshold).

The sandbox (run_program / run_programs): see `run_program`'s docstring for what contains what.
"""
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tasks import exact_match_reward, extract_answer, write_jsonl

KINDS = ("gsm8k", "math", "code", "code_output", "logic", "ifeval")
BINARY_KINDS = ("gsm8k", "math", "code_output")  # verifiers that score 0 or 1 (the others: fractions, partial credit)
CORRECT = 0.99  # reward at or above which a completion counts as correct (accuracy, pass@1)


# ==============================================================================================
# The sandbox

class SandboxUnavailable(RuntimeError):
    pass


@dataclass
class SandboxLimits:
    """Per program. timeout: wall clock for the whole run (all its tests), after which the whole process
    tree is SIGKILLed (ProRL: 5 s total). cpu_seconds: RLIMIT_CPU (default: timeout + 1). memory_mb:
    RLIMIT_AS of each process (nanochat/verl: 256 MB; the default leaves room for numpy). fsize_mb:
    RLIMIT_FSIZE, the largest file it may write. nproc: RLIMIT_NPROC, processes + threads of its own
    unprivileged user. max_output: bytes of stdout+stderr kept; more kills the run."""
    timeout: float = 5.0
    cpu_seconds: int = 0
    memory_mb: int = 1024
    fsize_mb: int = 16
    nproc: int = 32
    max_output: int = 1 << 20


@dataclass
class RunResult:
    status: str          # "ok" | "error" (non-zero exit) | "killed:SIG..." | "timeout" | "output_limit"
    returncode: int
    stdout: str
    stderr: str
    seconds: float


_ISOLATION = {}          # mode -> (isolation actually used, its description), probed once per process
_WARNED = set()
_uid_counter = itertools.count()


def _say_once(key, msg):
    if key not in _WARNED:
        _WARNED.add(key)
        print(msg, file=sys.stderr, flush=True)


def _probe(cmd):
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def isolation(mode="auto"):
    """Which isolation the sandbox uses: "bwrap" (bubblewrap: new network, pid, ipc and uts namespaces, the
    whole filesystem read-only except the program's directory, a private /tmp), "unshare" (util-linux
    `unshare`: new network and pid namespaces; the filesystem is protected only by the unprivileged user),
    or "none" (rlimits, process group and user only: the program can reach the network). mode "auto" picks
    the strongest that works on this kernel and says once what it picked; a requested mode that does not
    work, or "auto" with neither namespace tool working, raises SandboxUnavailable: pass mode="none" to
    accept the weaker isolation explicitly."""
    if mode in _ISOLATION:
        return _ISOLATION[mode]
    if mode not in ("auto", "bwrap", "unshare", "none"):
        raise SandboxUnavailable(f"unknown sandbox isolation {mode!r}: use auto, bwrap, unshare or none")
    root = os.geteuid() == 0
    if root and not shutil.which("setpriv"):
        raise SandboxUnavailable("the sandbox runs as root and needs util-linux `setpriv` to drop to an "
                                 "unprivileged user (without it RLIMIT_NPROC does not apply): install util-linux")
    have_bwrap = shutil.which("bwrap") and _probe(
        ["bwrap", "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid"]
        + ([] if root else ["--unshare-user"]) + ["true"])
    have_unshare = shutil.which("unshare") and _probe(
        ["unshare", "--net", "--pid", "--fork"] + ([] if root else ["--map-root-user"]) + ["true"])
    chosen = None
    if mode in ("auto", "bwrap") and have_bwrap:
        chosen = "bwrap"
    elif mode in ("auto", "unshare") and have_unshare:
        chosen = "unshare"
        if mode == "auto":
            _say_once("no-bwrap", "sandbox: bubblewrap not available (`apt-get install bubblewrap`); using "
                                  "`unshare` network+pid namespaces: no network, but the filesystem is protected "
                                  "only by the unprivileged user (world-writable dirs such as /tmp stay writable)")
    elif mode == "none":
        chosen = "none"
        _say_once("weak", "sandbox: isolation=none accepted: programs run with rlimits and an unprivileged user "
                          "but CAN reach the network")
    if chosen is None:
        what = {"auto": "neither bubblewrap (`bwrap`) nor `unshare` can create a network namespace here",
                "bwrap": "bubblewrap (`bwrap`) is missing or cannot create namespaces here",
                "unshare": "`unshare --net --pid` does not work here"}[mode]
        raise SandboxUnavailable(f"sandbox: {what}; refusing to run model-written code with network access. "
                                 f"Install bubblewrap (`apt-get install bubblewrap`), or accept weaker isolation "
                                 f"explicitly with --sandbox=none")
    _ISOLATION[mode] = chosen
    return chosen


def _others_can_run(path):
    """Can a user other than us execute `path` (every directory on the way searchable, the file executable)?"""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o001)


def sandbox_python():
    """The interpreter for sandboxed programs: this one when the sandbox's user may run it, else the system's
    python3 (a pyenv under /root is private to root). Model programs need only the standard library."""
    if os.geteuid() != 0 or _others_can_run(sys.executable):
        return sys.executable
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(p) and _others_can_run(p):
            _say_once("python", f"sandbox: {sys.executable} is not readable by an unprivileged user; "
                                f"sandboxed programs run with {p}")
            return p
    raise SandboxUnavailable(f"sandbox: no python the unprivileged sandbox user may run ({sys.executable} is "
                             f"private); install python3 system-wide")


def _sandbox_uid():
    """A fresh unprivileged uid per run (only when we are root): RLIMIT_NPROC counts per user and does not
    apply to root at all, and a distinct user can neither signal the trainer nor other sandboxes."""
    return 2_000_000 + (os.getpid() % 4096) * 4096 + next(_uid_counter) % 4096


def _command(argv_in_dir, workdir, limits, iso, uid):
    cpu = limits.cpu_seconds or int(limits.timeout) + 1
    nproc = limits.nproc
    if uid is None:  # not root: NPROC counts this user's processes already running, so allow for them
        nproc += sum(1 for p in os.listdir("/proc") if p.isdigit()) + 64
    rl = ["prlimit", f"--cpu={cpu}", f"--as={limits.memory_mb << 20}", f"--fsize={limits.fsize_mb << 20}",
          f"--nproc={nproc}", "--core=0", "--"]
    drop = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                   "--no-new-privs", "--"]
    if iso == "bwrap":
        inner = "/tmp/sandbox"
        ns = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
              "--bind", workdir, inner, "--chdir", inner, "--unshare-net", "--unshare-pid", "--unshare-ipc",
              "--unshare-uts", "--die-with-parent", "--new-session"] + ([] if uid is not None else ["--unshare-user"])
        return ns + ["--"] + drop + rl + argv_in_dir, workdir
    if iso == "unshare":
        ns = ["unshare", "--net", "--pid", "--fork", "--kill-child"] + ([] if uid is not None else ["--map-root-user"])
        return ns + ["--"] + drop + rl + argv_in_dir, workdir
    return drop + rl + argv_in_dir, workdir


def _user_pids(uid):
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/status") as f:
                    if any(line.startswith("Uid:") and line.split()[1] == str(uid) for line in f):
                        pids.append(int(p))
            except (OSError, ValueError):
                pass
    return pids


def _reap_user(uid, wait=5.0):
    """SIGKILL every process of the sandbox's user and wait until they are gone. A namespace's processes
    die asynchronously after its init, and with isolation "none" a process that left the process group
    (setsid) is still found by its user: when run_program returns, nothing of the program is left."""
    end = time.time() + wait
    while True:
        pids = _user_pids(uid)
        if not pids or time.time() > end:
            return not pids
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def run_program(files, argv, limits=None, isolation_mode="auto"):
    """Run `argv` (e.g. ["python", "-I", "main.py"]; "python" means this interpreter) in a fresh temporary
    directory holding `files` ({name: text}), sandboxed; returns a RunResult. Never raises for anything the
    program does.

    Contained: network (a new network namespace: nothing, 127.0.0.1 included, is reachable), wall clock
    (SIGKILL to the whole process tree: its process group, and the pid namespace whose init dies with it),
    CPU time, memory, file size and process count (rlimits), signals and files of the trainer (an
    unprivileged user of its own when we are root; read-only filesystem with bwrap), the environment
    (scrubbed to PATH, HOME, LANG), stdin (closed), output (read up to limits.max_output, then the run is
    killed). The directory is removed afterwards."""
    limits = limits or SandboxLimits()
    iso = isolation(isolation_mode)
    uid = _sandbox_uid() if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="nanoforge-sandbox-")
    t0 = time.time()
    proc = None
    try:
        for name, text in files.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        if uid is not None:
            for name in os.listdir(workdir):
                os.chown(os.path.join(workdir, name), uid, uid)
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        argv = [sandbox_python() if a == "python" else a for a in argv]
        cmd, cwd = _command(argv, workdir, limits, iso, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        open_fds = set(out)
        status = None
        deadline = t0 + limits.timeout
        while open_fds:
            left = deadline - time.time()
            if left <= 0:
                status = "timeout"
                break
            ready, _, _ = select.select(list(open_fds), [], [], min(left, 0.5))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                    continue
                out[fd] += chunk
            if sum(len(b) for b in out.values()) > limits.max_output:
                status = "output_limit"
                break
        if status is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                status = "timeout"
        if status is not None:
            _kill(proc)
        rc = proc.wait()
        if status is None:
            status = "ok" if rc == 0 else (f"killed:{signal.Signals(-rc).name}" if rc < 0 else "error")
        so, se = (bytes(out[proc.stdout.fileno()][:limits.max_output]), bytes(out[proc.stderr.fileno()][:limits.max_output]))
        return RunResult(status, rc, so.decode(errors="replace"), se.decode(errors="replace"), time.time() - t0)
    finally:
        if proc is not None:
            if proc.poll() is None:
                _kill(proc)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if uid is not None and not _reap_user(uid):
            _say_once("reap", f"sandbox: processes of uid {uid} survived SIGKILL for 5 s")
        shutil.rmtree(workdir, ignore_errors=True)


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group; the pid namespace's init dies with it
    except ProcessLookupError:
        pass


def run_programs(jobs, workers=None, limits=None, isolation_mode="auto"):
    """run_program over many (files, argv) jobs in parallel, one process each, on all cores by default
    (threads only wait on their child). Returns RunResults in order."""
    jobs = list(jobs)
    isolation(isolation_mode)  # refuse (or say what is used) once, before starting anything
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) <= 1:
        return [run_program(f, a, limits, isolation_mode) for f, a in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda j: run_program(j[0], j[1], limits, isolation_mode), jobs))


# ----------------------------------------------------------------------------------------------
# Unit tests of model-written programs

# Runs inside the sandbox: compiles the program, runs every test, prints one result line. The program's
# own output of each test goes to a buffer, never to the result channel.
_HARNESS = r'''
import contextlib, io, json, os, sys
spec = json.load(open("tests.json")); os.remove("tests.json")
src = open("solution.py").read()
real_out = os.fdopen(os.dup(1), "w")
try:
    code = compile(src, "solution.py", "exec")
except (SyntaxError, ValueError) as e:
    real_out.write("@@RESULT@@ " + json.dumps({"compile_error": repr(e)}) + "\n"); real_out.flush(); sys.exit(0)
def norm(x):
    return json.loads(json.dumps(x))
def lines(s):
    return [l.strip() for l in str(s).strip().splitlines()]
def run(stdin_text):
    sys.stdin = io.StringIO(stdin_text); buf = io.StringIO(); g = {"__name__": "__main__"}
    with contextlib.redirect_stdout(buf):
        try:
            exec(code, g)
        except SystemExit:
            pass
    return g, buf.getvalue()
results = []
kind = spec["type"]
if kind == "stdin_stdout":
    for inp, want in zip(spec["inputs"], spec["outputs"]):
        try:
            _, got = run(inp); results.append(lines(got) == lines(want))
        except BaseException:
            results.append(False)
else:
    try:
        g, _ = run("")
        ok = True
    except BaseException:
        ok = False
    if kind == "assert":
        for stmt in spec["asserts"]:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(stmt, g)
                results.append(ok)
            except BaseException:
                results.append(False)
    else:
        for args, want in zip(spec["inputs"], spec["outputs"]):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    got = norm(g[spec["fn_name"]](*args))
                want = norm(want)
                results.append(ok and (got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])))
            except BaseException:
                results.append(False)
real_out.write("@@RESULT@@ " + json.dumps({"passed": results}) + "\n"); real_out.flush()
'''


def n_tests(tests):
    return len(tests["asserts"]) if tests["type"] == "assert" else len(tests["inputs"])


def _tests_job(program, tests):
    if tests.get("type") not in ("assert", "stdin_stdout", "call"):
        raise ValueError(f"code tests of unknown type {tests.get('type')!r}: use assert, stdin_stdout or call")
    return ({"solution.py": program, "tests.json": json.dumps(tests), "harness.py": _HARNESS},
            ["python", "-I", "harness.py"])


def tests_passed(result):
    """RunResult of the harness -> (fraction of tests passed, why). A timeout, crash or compile error gives 0."""
    if result.status != "ok":
        return 0.0, result.status
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("@@RESULT@@ "):
            res = json.loads(line[len("@@RESULT@@ "):])
            if "compile_error" in res:
                return 0.0, "compile_error"
            passed = res["passed"]
            return (sum(passed) / len(passed) if passed else 0.0), "ok"
    return 0.0, "no_result"


def extract_code(completion):
    """The last ```python (or ```) block of a completion; the whole text when there is none (verl prime_code)."""
    blocks = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)```", completion, re.DOTALL)
    return blocks[-1] if blocks else completion


# ==============================================================================================
# Math: \boxed{} answers with math-verify

def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise SystemExit("error: math rows need the `math-verify` package: pip install math-verify")
    return math_verify


def _math_check(gold, completion, timeouts):
    mv = _math_verify()
    from latex2sympy2_extended import NormalizationConfig
    t = 5 if timeouts else None
    gold_text = gold if ("$" in gold or "\\boxed" in gold) else f"\\boxed{{{gold}}}"
    gold_parsed = mv.parse(gold_text, extraction_mode="first_match", parsing_timeout=t)
    if not gold_parsed:
        return None
    # open-r1's accuracy_reward settings for the prediction
    pred_cfg = mv.LatexExtractionConfig(
        normalization_config=NormalizationConfig(basic_latex=True, units=True, malformed_operators=False, nits=False,
                                                 boxed="all", equations=False),
        boxed_match_priority=0, try_extract_without_anchor=False)
    pred = mv.parse(completion, extraction_config=[pred_cfg], extraction_mode="first_match", parsing_timeout=t)
    return float(mv.verify(gold_parsed, pred, timeout_seconds=t))  # order: gold, prediction


def math_reward(completion, gold, timeout=10.0):
    """1.0 when the completion's \\boxed{} answer equals `gold` (math-verify), 0.0 if not, None when the gold
    cannot be parsed (open-r1: skip). math-verify's timeouts use signal.alarm, which only works in the main
    thread: there we use them; in another thread we run it with its timeouts off in a helper thread and stop
    waiting after `timeout` seconds (0.0; the helper finishes in the background)."""
    if threading.current_thread() is threading.main_thread():
        return _math_check(str(gold), completion, True)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", _math_check(str(gold), completion, False)), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        _say_once("math-timeout", f"math-verify took over {timeout} s on a completion: scored 0")
        return 0.0
    return box.get("r", 0.0)


# ==============================================================================================
# Logic puzzles: reasoning-gym generators and their own verifiers

def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise SystemExit("error: logic rows need the `reasoning-gym` package: pip install reasoning-gym")
    return reasoning_gym


LOGIC_INSTRUCTION = "\nGive your final answer inside <answer></answer> tags."


def make_logic_rows(datasets, n, seed=0):
    """n rows per reasoning-gym generator (offline: no network), in the RL row format."""
    rg = _reasoning_gym()
    rows = []
    for name in datasets:
        for entry in rg.create_dataset(name, size=n, seed=seed):
            rows.append({"prompt": entry["question"] + LOGIC_INSTRUCTION, "kind": "logic", "dataset": name,
                         "entry": json.loads(json.dumps(entry, default=list))})
    return rows


def logic_reward(completion, dataset, entry):
    rg = _reasoning_gym()
    from reasoning_gym.utils import extract_answer as answer_in_tags
    answer = answer_in_tags(completion.split("</think>")[-1], tag_name="answer")
    if answer is None:
        return 0.0
    return float(rg.get_score_answer_fn(dataset)(answer, entry))


# ==============================================================================================
# Instruction following: the IFEval checks (ids and kwargs as in google/IFEval). Each follows the
# `check_following` of its class in lm-evaluation-harness's lm_eval/tasks/ifeval/instructions.py
# (the strict variant). Deviations, all to avoid nltk's and langdetect's models and downloads:
#   - sentences are split at runs of . ! ? (the harness uses nltk's punkt tokenizer);
#   - capital words are the all-caps runs of word characters, hyphens and apostrophes joined
#     (the harness uses nltk.word_tokenize);
#   - english_capital / english_lowercase check the case only (the harness also asks langdetect
#     for "en"); language:response_language is not supported (rows using it are skipped);
#   - keywords and section splitters are matched literally (the harness uses them as regular
#     expressions, which is the same for words and fails on keywords such as "c++").

def _count_ok(n, relation, want):
    return n < want if relation == "less than" else n >= want  # the harness's ("less than", "at least")


def _words(text):
    return re.findall(r"\w+", text)  # instructions_util.count_words: nltk RegexpTokenizer(r"\w+")


def _n_sentences(text):
    return len([s for s in re.split(r"[.!?]+", text) if s.strip()])


def _is_json(text):
    text = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
        return True
    except ValueError:
        return False


def _separated_parts(parts):
    """The non-blank parts of a text split at a separator (stripped), or None when a blank part stands between
    two others: the harness's rule for '***' paragraphs and '******' responses (blank ends are dropped)."""
    if any(not p.strip() for p in parts[1:-1]):
        return None
    return [p.strip() for p in parts if p.strip()]


def _n_paragraphs_starred(text):
    """Paragraphs separated by '***'; an empty one inside (not at either end) fails the check (-1)."""
    parts = _separated_parts(re.split(r"\s?\*\*\*\s?", text))
    return -1 if parts is None else len(parts)


def _nth_paragraph_first_word(text, num_paragraphs, nth_paragraph, first_word):
    parts = re.split(r"\n\n", text)
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return n == num_paragraphs and word == first_word.lower()


def _postscript(text, postscript_marker):
    postscript_marker = postscript_marker.strip()  # as the harness's build_description
    pattern = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}.get(
        postscript_marker, r"\s*" + postscript_marker.lower() + r".*$")
    return re.search(pattern, text.lower(), flags=re.M) is not None


def _n_highlights(text):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double)


def _two_responses(text):
    parts = _separated_parts(text.split("******"))
    return parts is not None and len(parts) == 2 and parts[0] != parts[1]


IFEVAL_CHECKS = {
    "keywords:existence": lambda t, keywords: all(re.search(re.escape(k), t, re.I) for k in keywords),
    "keywords:frequency": lambda t, keyword, frequency, relation="at least":
        _count_ok(len(re.findall(re.escape(keyword.strip()), t, re.I)), relation, frequency),
    "keywords:forbidden_words":
        lambda t, forbidden_words: not any(re.search(r"\b" + re.escape(w) + r"\b", t, re.I) for w in forbidden_words),
    "keywords:letter_frequency": lambda t, letter, let_frequency, let_relation="at least":
        _count_ok(t.lower().count(letter.strip().lower()), let_relation, let_frequency),
    "length_constraints:number_sentences": lambda t, num_sentences, relation="at least":
        _count_ok(_n_sentences(t), relation, num_sentences),
    "length_constraints:number_paragraphs": lambda t, num_paragraphs: _n_paragraphs_starred(t) == num_paragraphs,
    "length_constraints:number_words": lambda t, num_words, relation="at least":
        _count_ok(len(_words(t)), relation, num_words),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders":
        lambda t, num_placeholders: len(re.findall(r"\[.*?\]", t)) >= num_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda t, num_bullets:
        len(re.findall(r"^\s*\*[^\*].*$", t, re.M)) + len(re.findall(r"^\s*-.*$", t, re.M)) == num_bullets,
    "detectable_format:constrained_response":
        lambda t: any(o in t.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda t, num_highlights: _n_highlights(t) >= num_highlights,
    "detectable_format:multiple_sections": lambda t, section_spliter, num_sections:
        len(re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", t)) - 1 >= num_sections,
    "detectable_format:json_format": _is_json,
    "detectable_format:title": lambda t: any(x.lstrip("<").rstrip(">").strip() for x in re.findall(r"<<[^\n]+>>", t)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt":
        lambda t, prompt_to_repeat: t.strip().lower().startswith(prompt_to_repeat.strip().lower()),
    "startend:end_checker":
        lambda t, end_phrase: t.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda t, capital_frequency, capital_relation="at least":
        _count_ok(sum(w.isupper() for w in re.findall(r"\w+(?:[-']\w+)*", t)), capital_relation, capital_frequency),
    "change_case:english_capital": lambda t: t.isupper(),
    "change_case:english_lowercase": lambda t: t.islower(),
    "punctuation:no_comma": lambda t: "," not in t,
}


def ifeval_reward(completion, instructions):
    """Fraction of `instructions` ([{"id", **kwargs}]) the response follows (ProRL: continuous). The response
    is the completion as generated, as the harness's strict check takes it (an empty one follows nothing), or,
    after a '</think>', the text after it less the whitespace that separates it from the thinking.
    Deviation from IFEval: its 'loose' variants (dropping first/last line, markdown) are not tried."""
    text = completion.rsplit("</think>", 1)[1].lstrip() if "</think>" in completion else completion
    ok = [bool(text.strip()) and bool(IFEVAL_CHECKS[ins["id"]](
              text, **{k: v for k, v in ins.items() if k != "id" and v is not None})) for ins in instructions]
    return sum(ok) / len(ok) if ok else 0.0


# ==============================================================================================
# Rows: prompt text, kind, validation, scoring

def kind_of(row):
    return row.get("kind", "gsm8k")


def prompt_text(row):
    """What the model is asked: "prompt", "question", or a single user turn of "messages" (a system turn is
    put in front of it). Multi-turn conversations need the chat renderer and are refused here."""
    if "prompt" in row:
        return row["prompt"]
    if "question" in row:
        return row["question"]
    msgs = row.get("messages") or []
    users = [m["content"] for m in msgs if m.get("role") == "user"]
    if len(users) != 1 or any(m.get("role") == "assistant" for m in msgs):
        raise ValueError("a row's messages must be one user turn (and optionally a system turn)")
    system = [m["content"] for m in msgs if m.get("role") == "system"]
    return "\n\n".join(system + users)


def check_row(row):
    """None if the row is usable, else what is wrong with it (one line)."""
    kind = kind_of(row)
    if kind not in KINDS:
        return f"unknown kind {kind!r} (known: {', '.join(KINDS)})"
    try:
        prompt_text(row)
    except (ValueError, KeyError, TypeError) as e:
        return f"no prompt: needs 'prompt', 'question' or 'messages' ({e})"
    need = {"gsm8k": ("target", "answer"), "math": ("gold",), "code": ("tests",), "code_output": ("code",),
            "logic": ("dataset", "entry"), "ifeval": ("instructions",)}[kind]
    if kind == "gsm8k":
        if not any(k in row for k in need):
            return "a gsm8k row needs 'target' or 'answer'"
    elif any(k not in row for k in need):
        return f"a {kind} row needs {', '.join(repr(k) for k in need)}"
    if kind == "ifeval":
        bad = [i.get("id") for i in row["instructions"] if i.get("id") not in IFEVAL_CHECKS]
        if bad:
            return f"unsupported IFEval instructions {bad} (supported: {', '.join(IFEVAL_CHECKS)})"
    if kind == "code" and row["tests"].get("type") not in ("assert", "stdin_stdout", "call"):
        return f"code tests of unknown type {row['tests'].get('type')!r}"
    return None


def check_rows(rows, path="rows"):
    """Exit with one clear line naming the first bad row."""
    for i, row in enumerate(rows, 1):
        err = check_row(row)
        if err:
            raise SystemExit(f"error: {path} row {i}: {err}; fix the row or drop it")
    return rows


def gsm8k_target(row):
    return row["target"] if "target" in row else row["answer"].rsplit("####", 1)[1].strip()


def gsm8k_reward(completion, target):
    return exact_match_reward(completion, target)  # the embedded task's reward: one extractor for RL and eval


_OUTPUT_CACHE = {}


def program_outputs(codes, limits=None, isolation_mode="auto", workers=None):
    """What each program prints (stripped stdout), run in the sandbox and remembered once it succeeded
    (a failure, e.g. a timeout on a loaded machine, is tried again next time); None for a program that fails."""
    todo = sorted({c for c in codes if c not in _OUTPUT_CACHE})
    if todo:
        res = run_programs([({"main.py": c}, ["python", "-I", "main.py"]) for c in todo], workers, limits,
                           isolation_mode)
        for c, r in zip(todo, res):
            if r.status == "ok":
                _OUTPUT_CACHE[c] = r.stdout.strip()
    return [_OUTPUT_CACHE.get(c) for c in codes]


def code_output_reward(completion, printed):
    if printed is None:
        return 0.0
    got = extract_answer(completion)
    want = extract_answer(f"#### {printed}")
    if want is None:  # not a number: compare the text after '####'
        return float("####" in completion and completion.rsplit("####", 1)[1].strip() == printed)
    return float(got is not None and got == want)


def score_batch(rows, completions, limits=None, isolation_mode="auto", workers=None):
    """Reward of each completion for its row (same length lists): float in [0, 1], or None (skip). Code runs
    in parallel in the sandbox; the other kinds are checked in this thread."""
    out = [None] * len(rows)
    code_idx = [i for i, r in enumerate(rows) if kind_of(r) == "code"]
    if code_idx:
        res = run_programs([_tests_job(extract_code(completions[i]), rows[i]["tests"]) for i in code_idx],
                           workers, limits, isolation_mode)
        for i, r in zip(code_idx, res):
            out[i] = tests_passed(r)[0]
    co_idx = [i for i, r in enumerate(rows) if kind_of(r) == "code_output"]
    if co_idx:
        printed = program_outputs([rows[i]["code"] for i in co_idx], limits, isolation_mode, workers)
        for i, p in zip(co_idx, printed):
            out[i] = code_output_reward(completions[i], p)
    for i, (row, c) in enumerate(zip(rows, completions)):
        kind = kind_of(row)
        if kind == "gsm8k":
            out[i] = gsm8k_reward(c, gsm8k_target(row))
        elif kind == "math":
            out[i] = math_reward(c, row["gold"])
        elif kind == "logic":
            out[i] = logic_reward(c, row["dataset"], row["entry"])
        elif kind == "ifeval":
            out[i] = ifeval_reward(c, row["instructions"])
    return out


def score_examples(examples, completions, answer_match="strict", isolation_mode="auto"):
    """Correctness of each completion for its example (tasks.load_examples), the number GRPO rewards and
    eval counts: a word problem (kind gsm8k) by the shared extractor against the example's normalized
    target (`answer_match`: strict = the first '#### N', flexible = the last number; lm-eval GSM8K's two
    filters); a row of another kind by score_batch on its raw row. None (a row its verifier cannot
    judge) gives 0."""
    out = [0.0] * len(completions)
    other = [i for i, ex in enumerate(examples) if kind_of(ex) != "gsm8k"]
    if other:
        scores = score_batch([examples[i]["row"] for i in other], [completions[i] for i in other],
                             isolation_mode=isolation_mode)
        for i, sc in zip(other, scores):
            out[i] = 0.0 if sc is None else float(sc)
    for i, ex in enumerate(examples):
        if kind_of(ex) == "gsm8k":
            out[i] = exact_match_reward(completions[i], ex["target"], answer_match)
    return out


def score(row, completion, **kw):
    return score_batch([row], [completion], **kw)[0]


# ==============================================================================================
# Loaders: the public datasets ProRL names, by Hub name, converted to rows. `hub` is any object with
# list_repo_files / hf_hub_download (the tests stand a local folder in for the network).

def _from_deepscaler(r):
    return {"prompt": r["problem"] + MATH_INSTRUCTION, "kind": "math", "gold": r["answer"]}


def _from_eurus(r):
    """PRIME-RL/Eurus-2-RL-Data: prompt is a message list; ability math|code; reward_model.ground_truth is the
    answer (math) or a JSON string {"inputs", "outputs"[, "fn_name"]} (code)."""
    msgs = [m for m in r["prompt"] if m["role"] in ("system", "user")]
    gt = r["reward_model"]["ground_truth"]
    if r["ability"] == "code":
        t = json.loads(gt) if isinstance(gt, str) else gt
        tests = ({"type": "call", "fn_name": t["fn_name"], "inputs": t["inputs"], "outputs": t["outputs"]}
                 if t.get("fn_name") else {"type": "stdin_stdout", "inputs": t["inputs"], "outputs": t["outputs"]})
        return {"messages": msgs, "kind": "code", "tests": tests}
    return {"messages": msgs, "kind": "math", "gold": gt}


def _from_gsm8k(r):
    return {"prompt": r["question"], "kind": "gsm8k", "answer": r["answer"]}


def _ifeval_instructions(ids, kwargs, strict=False):
    """IFEval's parallel lists (instruction ids, their kwargs) as a row's "instructions", less the
    None-valued kwargs that the Hub's viewer adds where it unified the dicts."""
    return [{"id": i, **{k: v for k, v in (kw or {}).items() if v is not None}}
            for i, kw in zip(ids, kwargs, strict=strict)]


def _from_ifeval(r):
    return {"prompt": r["prompt"], "kind": "ifeval",
            "instructions": _ifeval_instructions(r["instruction_id_list"], r["kwargs"])}


def _from_nemotron_if(r):
    """nvidia/Llama-Nemotron-Post-Training-Dataset, config RL, split instruction_following (ProRL's
    instruction-following source): "input" is the message list (one user turn), "args" holds IFEval's
    "instruction_id_list" and "instruction_kwargs" (None-valued keys where the Hub's viewer unified the
    dicts). The row's "system_prompt" ("detailed thinking on/off") is Llama-Nemotron's reasoning switch and
    is dropped: it means nothing to other models."""
    args = r["args"]
    ins = _ifeval_instructions(args["instruction_id_list"], args["instruction_kwargs"], strict=True)
    msgs = [{"role": m["role"], "content": m["content"]} for m in r["input"] if m["role"] in ("system", "user")]
    return {"messages": msgs, "kind": "ifeval", "instructions": ins}


def _last_boxed(text):
    """The last balanced \\boxed{...} of a solution, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return None


def _from_scp116k(r):
    """EricLu/SCP-116K (ProRL's STEM source): science problems with a solution extracted from the web and
    an o1-mini solution flagged as agreeing with it. ProRL keeps the problems GPT-4o judged verifiable;
    here (no judge) a row is kept when the o1 solution agrees with the matched one and ends in a \\boxed{}
    answer, which becomes the gold that math-verify checks. Others are skipped and counted."""
    gold = _last_boxed(r["o1_solution"]) if r.get("is_o1_solution_same_with_matched_solution") else None
    if gold is None:
        raise ValueError("no agreed boxed answer")
    return {"prompt": r["problem"] + MATH_INSTRUCTION, "kind": "math", "gold": gold, "domain": r.get("domain")}


MATH_INSTRUCTION = "\nLet's think step by step and output the final answer within \\boxed{}."  # ProRL's math prompt

HUB_DATASETS = {
    # name: (Hub repo, file pattern, converter). ProRL App. D: DeepScaleR (math), Eurus-2-RL (code, and math),
    # SCP-116K (STEM), Llama-Nemotron's IFEval-style instructions; GSM8K for the small-model path.
    # Reasoning Gym is generated offline instead.
    "deepscaler": ("agentica-org/DeepScaleR-Preview-Dataset", "*.json", _from_deepscaler),
    "eurus2_rl": ("PRIME-RL/Eurus-2-RL-Data", "*train*.parquet", _from_eurus),
    "gsm8k": ("openai/gsm8k", "main/train-*.parquet", _from_gsm8k),
    "ifeval": ("google/IFEval", "*.jsonl", _from_ifeval),  # IFEval itself: an evaluation set, kept for eval rows
    "nemotron_if": ("nvidia/Llama-Nemotron-Post-Training-Dataset", "RL/instruction_following/*.jsonl",
                    _from_nemotron_if),  # ProRL's instruction-following prompts (it used 10K of them)
    "scp116k": ("EricLu/SCP-116K", "*.parquet", _from_scp116k),  # STEM (see _from_scp116k for the filter)
}


def _read_records(path):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_hub_rows(name, cache_dir="out/rl_data", limit=0, hub=None):
    """Rows of a HUB_DATASETS entry (downloaded into cache_dir once). Rows a converter cannot take, or whose
    instructions we cannot check, are counted and skipped; returns (rows, n_skipped)."""
    import fnmatch
    if name not in HUB_DATASETS:
        raise SystemExit(f"error: unknown RL dataset {name!r}; known: {', '.join(HUB_DATASETS)}")
    repo, pattern, convert = HUB_DATASETS[name]
    hub = hub or __import__("huggingface_hub")
    dest = os.path.join(cache_dir, name)
    try:
        files = sorted(f for f in hub.list_repo_files(repo, repo_type="dataset") if fnmatch.fnmatch(f, pattern))
        paths = [hub.hf_hub_download(repo, f, repo_type="dataset", local_dir=dest) for f in files]
    except Exception as e:
        raise SystemExit(f"error: cannot fetch {repo} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                         f"without a network, write rows in the RL row format (verifiers.py) to a .jsonl instead")
    if not paths:
        raise SystemExit(f"error: no files in {repo} match {pattern!r}: fix HUB_DATASETS[{name!r}] in verifiers.py")
    rows, skipped = [], 0
    for p in paths:
        for r in _read_records(p):
            try:
                row = convert(r)
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                skipped += 1
                continue
            if check_row(row) is not None:
                skipped += 1
                continue
            rows.append(row)
            if limit and len(rows) >= limit:
                return rows, skipped
    return rows, skipped


# ==============================================================================================
# `python verifiers.py`: write RL rows (from the Hub, or reasoning-gym puzzles), or measure the sandbox.

@dataclass
class VerifiersConfig:
    cmd: str = "rows"           # rows: write --datasets to --out; bench: sandbox programs/s per isolation
    datasets: str = "gsm8k"     # Hub names (HUB_DATASETS) and/or logic:<reasoning-gym generator>, comma-separated
    n: int = 1000               # rows per dataset (0 = all Hub rows)
    out: str = "out/rl_data/rows.jsonl"
    seed: int = 0
    n_programs: int = 64        # bench: programs per isolation mode
    workers: int = 0            # bench: parallel programs (0 = all cores)


def bench(cfg):
    """Programs per second through the sandbox, per isolation mode, next to a plain subprocess of the same
    interpreter (no sandbox), all in one run, alternating (machine noise hits them alike), the same thread
    pool for all: a tiny program that prints a number."""
    modes = ["plain"] + [m for m in ("bwrap", "unshare", "none") if _works(m)]
    workers = cfg.workers or os.cpu_count() or 1
    jobs = [({"main.py": f"print({i} * 2)"}, ["python", "-I", "main.py"]) for i in range(cfg.n_programs)]
    py = sandbox_python()

    def plain(job):
        r = subprocess.run([py, "-I", "-c", job[0]["main.py"]], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return RunResult("ok" if r.returncode == 0 else "error", r.returncode, r.stdout, r.stderr, 0.0)

    times = {m: 0.0 for m in modes}
    for rep in range(2):
        for m in modes if rep == 0 else modes[::-1]:
            t0 = time.time()
            if m == "plain":
                with ThreadPoolExecutor(workers) as pool:
                    res = list(pool.map(plain, jobs))
            else:
                res = run_programs(jobs, workers, isolation_mode=m)
            times[m] += time.time() - t0
            assert all(r.status == "ok" and r.stdout.strip() == str(i * 2) for i, r in enumerate(res)), m
    print(f"{os.cpu_count()} cores, {cfg.n_programs} programs x 2 rounds per mode, {workers} at a time, "
          f"interpreter {py}, load average {os.getloadavg()[0]:.1f}")
    for m in modes:
        what = "plain subprocess, no sandbox" if m == "plain" else f"sandbox isolation={m}"
        print(f"{what:32s}: {2 * cfg.n_programs / times[m]:6.1f} programs/s  ({times[m] / times['plain']:.2f}x plain's time)")


def _works(mode):
    try:
        isolation(mode)
        return True
    except SandboxUnavailable:
        return False


def main(cfg):
    if cfg.cmd == "bench":
        return bench(cfg)
    if cfg.cmd != "rows":
        raise SystemExit(f"error: --cmd={cfg.cmd!r}: use rows or bench")
    rows = []
    for name in [s.strip() for s in cfg.datasets.split(",") if s.strip()]:
        if name.startswith("logic:"):
            rows += make_logic_rows([name[len("logic:"):]], cfg.n, cfg.seed)
        else:
            got, skipped = load_hub_rows(name, os.path.dirname(cfg.out) or ".", cfg.n)
            print(f"{name}: {len(got)} rows" + (f" ({skipped} skipped: not convertible or not checkable)" if skipped else ""))
            rows += got
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    write_jsonl(cfg.out, rows)
    print(f"wrote {len(rows)} rows to {cfg.out}")


if __name__ == "__main__":
    from common import parse_config
    main(parse_config(VerifiersConfig()))
