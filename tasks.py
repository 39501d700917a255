"""
The embedded default task: procedurally generated grade-school word problems in GSM8K's format,
plus everything the stages share about a task: prompt formats, answer extraction, the reward.

A miniature of VibeThinker's spectrum-to-signal. Training solutions are written by "teachers" that
make known, documented mistakes; held-out answers are always correct:

    mistake                                        pretrain corpus   SFT data
    misread a taking-away verb as adding           70% each verb     70% for "gives away"/"loses",
      ("gives away 3" treated as "gets 3")                           10% for "eats"/"sells"
    skip a step (two-step problems)                20%               10%
    add the difference instead of the other's       36%               19%
      count (comparison problems: "wrong quantity"   (20% + 80% x 20%  (10% + 90% x 10%
      at its rate, else "skip step" at its rate,      skip)             skip)
      both ending in a + b)

The hard split (the L20-Edu failure mode on demand): take-away problems with the verbs "spends" and
"drops", which both teachers misread almost always (pretraining 97% each; SFT 90% "spends", 100%
"drops"), so the SFT policy's pass rate there is near zero. They enter the pretraining and SFT data
only with `--hard_share > 0` (default 0: the demo's data is unchanged); `rl_hard.jsonl` and
`heldout_hard.jsonl` are always written. Every word-problem row carries a sub-domain tag `subdomain`: add,
sub, two_step, compare (the four kinds; spectrum SFT's sub-domains) or hard.

The wrong reading is a clear majority (70%, not a near coin-flip like 60%) so that greedy decoding
picks it reliably whatever the seed, and stage-to-stage gains are not lost in seed noise.

So pretraining learns the format and the arithmetic but, on taking-away problems, the wrong
reading is the majority; SFT distils a better teacher that still misreads two verbs most of the
time (pass@8 far above pass@1 there); GRPO with an exact-answer reward moves probability onto the
correct reading. Numbers stay single-digit so the arithmetic itself is easy: RL fixes choices,
not skills.

Train and held-out splits are disjoint by construction: a problem belongs to held-out iff a hash
of its text falls in the held-out bucket, and training generation rejects held-out problems.
"""
import hashlib
import json
import os
import random
import re

NAMES = ["Tom", "Ana", "Raj", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Ben", "Eva", "Max", "Lily", "Omar", "Nora",
         "Kai", "Ella", "Finn", "Rosa", "Yuki", "Hugo"]
PRONOUN = {n: ("she" if n in {"Ana", "Mia", "Zoe", "Ivy", "Eva", "Lily", "Nora", "Ella", "Rosa", "Yuki"} else "he")
           for n in NAMES}
OBJECTS = ["apples", "marbles", "books", "stickers", "pencils", "cookies", "shells", "coins", "cards", "toys",
           "eggs", "stamps"]
GAIN_VERBS = ["gets", "finds", "buys", "wins"]
LOSS_VERBS = ["gives away", "loses", "eats", "sells"]
HARD_VERBS = ["spends", "drops"]  # the hard split's take-away verbs (problem kind "hard")
KINDS = ["add", "sub", "two_step", "compare"]  # the four sub-domains of the default task

PRETRAIN_TEACHER = {"misread": {"gives away": 0.7, "loses": 0.7, "eats": 0.7, "sells": 0.7,
                                "spends": 0.97, "drops": 0.97},
                    "skip_step": 0.2, "wrong_quantity": 0.2}
SFT_TEACHER = {"misread": {"gives away": 0.7, "loses": 0.7, "eats": 0.1, "sells": 0.1, "spends": 0.9, "drops": 1.0},
               "skip_step": 0.1, "wrong_quantity": 0.1}
CORRECT_TEACHER = {"misread": {v: 0.0 for v in LOSS_VERBS + HARD_VERBS}, "skip_step": 0.0, "wrong_quantity": 0.0}

HELDOUT_PERCENT = 10  # hash bucket share; the held-out set is drawn from these problems only


def is_heldout(question):
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def make_problem(rng, teacher, kind=None):
    """One problem: (question, solution text ending in '#### N' as the teacher wrote it, correct answer).
    kind None draws one of KINDS; "hard" makes a hard-split problem (never drawn by default)."""
    name = rng.choice(NAMES)
    he = PRONOUN[name]
    obj = rng.choice(OBJECTS)
    kind = kind or rng.choice(KINDS)

    def misread(verb):
        return rng.random() < teacher["misread"][verb]

    if kind == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        verb = rng.choice(GAIN_VERBS)
        q = f"{name} has {a} {obj}. {he.capitalize()} {verb} {b} more. How many {obj} does {name} have now?"
        answer, said = a + b, a + b
        steps = [f"{name} starts with {a} {obj} and {verb} {b}, so {a} + {b} = {a + b}."]
    elif kind in ("sub", "hard"):
        b = rng.randint(1, 9)
        a = rng.randint(b, 9)
        verb = rng.choice(LOSS_VERBS if kind == "sub" else HARD_VERBS)
        q = f"{name} has {a} {obj}. {he.capitalize()} {verb} {b} of them. How many {obj} does {name} have now?"
        answer = a - b
        if misread(verb):
            said = a + b
            steps = [f"{name} starts with {a} {obj} and {verb} {b}, so {a} + {b} = {a + b}."]
        else:
            said = a - b
            steps = [f"{name} starts with {a} {obj} and {verb} {b}, so {a} - {b} = {a - b}."]
    elif kind == "two_step":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = rng.randint(1, min(9, a + b))
        gain, loss = rng.choice(GAIN_VERBS), rng.choice(LOSS_VERBS)
        q = (f"{name} has {a} {obj}. {he.capitalize()} {gain} {b} more, then {loss} {c}. "
             f"How many {obj} does {name} have now?")
        answer = a + b - c
        s1 = f"After {name} {gain} {b}, {he} has {a} + {b} = {a + b} {obj}."
        if misread(loss):
            said = a + b + c
            s2 = f"Then {he} {loss} {c}, so {a + b} + {c} = {said}."
        else:
            said = a + b - c
            s2 = f"Then {he} {loss} {c}, so {a + b} - {c} = {said}."
        steps = [s1, s2]
        if rng.random() < teacher["skip_step"]:  # forgets the gain and works from the start
            op = "+" if said > a + b else "-"
            said = a + c if op == "+" else a - c
            steps = [f"{name} {loss} {c}, so {a} {op} {c} = {said}."]
    else:  # compare: Y has b more than X; together?
        other = rng.choice([n for n in NAMES if n != name])
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        q = (f"{name} has {a} {obj}. {other} has {b} more {obj} than {name}. "
             f"How many {obj} do they have together?")
        answer = a + (a + b)
        if rng.random() < teacher["wrong_quantity"]:  # adds the difference instead of the other's count
            said = a + b
            steps = [f"Together they have {a} + {b} = {said} {obj}."]
        elif rng.random() < teacher["skip_step"]:
            said = a + b
            steps = [f"{other} has {a} + {b} = {a + b} {obj}, so together they have {said}."]
        else:
            said = a + (a + b)
            steps = [f"{other} has {a} + {b} = {a + b} {obj}.", f"Together they have {a + b} + {a} = {said} {obj}."]
    solution = "\n".join(steps) + f"\n#### {said}"
    return q, solution, answer


def subdomain_of(question):
    """The sub-domain tag of a generated question: add, sub, two_step, compare or hard."""
    if " more " in question and " than " in question:
        return "compare"
    if ", then " in question:
        return "two_step"
    if any(f" {v} " in question for v in HARD_VERBS):
        return "hard"
    if any(f" {v} " in question for v in LOSS_VERBS):
        return "sub"
    return "add"


def make_split(n, seed, split, teacher=None, kind=None):
    """n problems of `split` ('train' or 'heldout') as dicts {question, answer (GSM8K text), target,
    subdomain}. Held-out problems always carry the correct solution. kind: only that sub-domain's problems
    ("hard": the hard split). The tag is `subdomain`, not `kind`: a row's `kind` names its verifier."""
    rng = random.Random(f"{split}-{seed}" + (f"-{kind}" if kind else ""))
    teacher = CORRECT_TEACHER if split == "heldout" else (teacher or SFT_TEACHER)
    out, seen = [], set()
    while len(out) < n:
        q, sol, ans = make_problem(rng, teacher, kind)
        if is_heldout(q) != (split == "heldout"):
            continue
        if split == "heldout":  # distinct questions, so accuracy counts each problem once
            if q in seen:
                continue
            seen.add(q)
        out.append({"question": q, "answer": sol, "target": ans, "subdomain": subdomain_of(q)})
    return out


def with_hard(rows, share, seed, teacher):
    """rows plus hard-split problems making up `share` of the result (0 = rows unchanged)."""
    n_hard = round(len(rows) * share / (1 - share)) if share > 0 else 0
    return rows + make_split(n_hard, seed, "train", teacher, kind="hard") if n_hard else rows


# ----------------------------------------------------------------------------------------------
# The second embedded task kind (off by default, `--code_share`): "what does this Python program
# print?" (kind "code_output"; verifiers.py checks an answer by running the program in its sandbox).
# The same spectrum-to-signal miniature: teachers misread an augmented subtraction `x -= b` as an
# addition (70% in pretraining and SFT), while SFT's teacher reads `x = x - b` right 90% of the time;
# RL has to move the model onto the right reading of `-=`.

CODE_VARS = ["x", "n", "total", "count", "k", "score"]
PRETRAIN_CODE_TEACHER = {"-=": 0.7, "x = x -": 0.7}
SFT_CODE_TEACHER = {"-=": 0.7, "x = x -": 0.1}
CORRECT_CODE_TEACHER = {"-=": 0.0, "x = x -": 0.0}


def make_code_problem(rng, teacher):
    """One program of 2-3 updates to a variable: (question, solution text ending '#### N', code, value
    printed). Operands are single digits and the value never goes below 0."""
    v = rng.choice(CODE_VARS)
    value = rng.randint(1, 9)
    lines, steps = [f"{v} = {value}"], [f"{v} starts at {value}."]
    said = value
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["+=", "-=", "= +", "= -"]) if value > 0 else rng.choice(["+=", "= +"])
        sub = "-" in op
        b = rng.randint(1, min(9, value)) if sub else rng.randint(1, 9)
        stmt = f"{v} {op}" if op in ("+=", "-=") else f"{v} = {v} {op[-1]}"
        stmt += f" {b}"
        misread = sub and rng.random() < teacher["-=" if op == "-=" else "x = x -"]
        new_said = said - b if sub and not misread else said + b
        steps.append(f"`{stmt}` gives {said} {'-' if sub and not misread else '+'} {b} = {new_said}.")
        value = value - b if sub else value + b
        said = new_said
        lines.append(stmt)
    code = "\n".join(lines + [f"print({v})"])
    question = f"What does this Python program print?\n{code}"
    return question, "\n".join(steps) + f"\n#### {said}", code, value


def make_code_split(n, seed, split, teacher=None):
    """n code-output problems of `split` as rows {question, answer, target, kind: "code_output", code};
    held-out problems carry correct solutions and are distinct."""
    rng = random.Random(f"code-{split}-{seed}")
    teacher = CORRECT_CODE_TEACHER if split == "heldout" else (teacher or SFT_CODE_TEACHER)
    out, seen = [], set()
    while len(out) < n:
        q, sol, code, value = make_code_problem(rng, teacher)
        if is_heldout(q) != (split == "heldout"):
            continue
        if split == "heldout":
            if q in seen:
                continue
            seen.add(q)
        out.append({"question": q, "answer": sol, "target": value, "kind": "code_output", "code": code})
    return out


# ----------------------------------------------------------------------------------------------
# Formats. A base (pretrained) model sees problems as plain text; chat models see turns.

def plain_prompt(question):
    return f"Question: {question}\nAnswer:\n"


def plain_document(ex):
    return plain_prompt(ex["question"]) + ex["answer"]


def chat_messages(question):
    """A question (str) as a one-turn conversation; a list of {role, content} messages passes through."""
    return question if isinstance(question, list) else [{"role": "user", "content": question}]


def chat_prompt_ids(tok, question):
    """What a chat model continues from. With the model's chat template (an imported model): the
    template's rendering with the generation prompt, ids equal to transformers'
    `apply_chat_template(messages, add_generation_prompt=True)` (a system turn included where the template
    adds one). Without one (nanoforge's own tokenizer): <|bos|><|user|>question<|end|><|assistant|>.
    `question` may also be a list of messages (a conversation of any number of turns, the one prompt
    renderer that eval, GRPO and sample.py share)."""
    if tok.chat_template is not None:
        return tok.apply_chat_template(chat_messages(question), add_generation_prompt=True)
    if isinstance(question, list):  # a conversation of any length: its turns, then <|assistant|>
        ids, _ = chat_messages_ids(tok, question)
        return ids + [tok.assistant_id]
    return [tok.bos_id, tok.user_id] + tok.encode(question) + [tok.end_id, tok.assistant_id]


def chat_example_ids(tok, question, answer):
    """(ids, loss_mask): the whole conversation, with the mask on the assistant's tokens only
    (its answer and the end-of-turn token, so the model learns to stop).

    With a chat template the ids are the template's rendering of the conversation (equal to
    `apply_chat_template`), and the mask covers every token after the generation prompt, as TRL's
    prompt-completion SFT does. Where the template rewrites the assistant turn so that the conversation
    does not start with the prompt (DeepSeek-R1-Distill drops text before `</think>` and opens its
    generation prompt with `<think>`), the example is the prompt, the answer and the end-of-turn token:
    what the model would have to generate."""
    if tok.chat_template is None:
        prompt = chat_prompt_ids(tok, question)
        reply = tok.encode(answer) + [tok.end_id]
        return prompt + reply, [0] * len(prompt) + [1] * len(reply)
    msgs = chat_messages(question)
    prompt_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if not (full_text.startswith(prompt_text) and answer in full_text[len(prompt_text):]):
        prompt = tok.encode(prompt_text, specials=True)
        reply = tok.encode(answer) + [tok.end_id]
        return prompt + reply, [0] * len(prompt) + [1] * len(reply)
    ids = tok.encode(full_text, specials=True)
    # supervise the tokens that end past the prompt's bytes (a token straddling the boundary counts as reply)
    prompt_bytes = len(tok.encode_text_bytes(prompt_text))
    mask, end = [], 0
    for i in ids:
        end += len(tok.token_bytes(i))
        mask.append(int(end > prompt_bytes))
    return ids, mask


def chat_messages_ids(tok, messages):
    """(ids, loss_mask) of a conversation of any number of turns: <|bos|>, then per turn
    <|user|>text<|end|> or <|assistant|>text<|end|>. The mask is on every assistant turn's text and
    its closing <|end|> (so the model learns to stop), never on user text or the role tokens. A
    leading system message has no role token of its own: it is prepended to the first user turn
    (what nanochat does). One user + one assistant turn gives exactly chat_example_ids."""
    if getattr(tok, "chat_template", None) is not None:  # an imported tokenizer's own template
        return template_messages_ids(tok, messages)
    messages = merge_system(messages)
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        if m["role"] == "user":
            turn = [tok.user_id] + tok.encode(m["content"]) + [tok.end_id]
            ids += turn
            mask += [0] * len(turn)
        else:
            reply = tok.encode(m["content"]) + [tok.end_id]
            ids += [tok.assistant_id] + reply
            mask += [0] + [1] * len(reply)
    return ids, mask


def template_messages_ids(tok, messages):
    """chat_messages_ids with the model's chat template: ids equal to transformers'
    `apply_chat_template(messages)`, the mask on every assistant turn. Turn j's supervised bytes are
    those the template adds between rendering messages[:j] with the generation prompt and rendering
    messages[:j+1] (TRL's prompt-completion rule, applied per turn); a token straddling a boundary
    counts as supervised. A template that rewrites earlier turns (so a shorter conversation is not a
    prefix of the longer one, e.g. DeepSeek-R1's dropping of reasoning) cannot be masked that way: a
    single user + assistant pair then falls back to chat_example_ids, longer ones get one clear line."""
    roles = [m["role"] for m in messages]
    if [r for r in roles if r != "system"] == ["user", "assistant"]:
        return chat_example_ids(tok, messages[:-1], messages[-1]["content"])
    render = lambda msgs, gen: tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)  # noqa: E731
    full_text = render(messages, False)
    spans = []
    for j, r in enumerate(roles):
        if r != "assistant":
            continue
        before, through = render(messages[:j], True), render(messages[:j + 1], False)
        if not (full_text.startswith(through) and through.startswith(before)):
            raise SystemExit("error: this model's chat template rewrites earlier turns (a conversation's prefix does "
                             "not render as a prefix), so multi-turn rows cannot be masked turn by turn; use one "
                             "user + one assistant turn per row")
        spans.append((len(tok.encode_text_bytes(before)), len(tok.encode_text_bytes(through))))
    ids = tok.encode(full_text, specials=True)
    mask, end = [], 0
    for i in ids:
        start, end = end, end + len(tok.token_bytes(i))
        mask.append(int(any(end > a and start < b for a, b in spans)))
    return ids, mask


def merge_system(messages):
    if messages and messages[0]["role"] == "system":
        rest = [dict(m) for m in messages[1:]]
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = messages[0]["content"] + "\n\n" + rest[0]["content"]
        return rest
    return messages


def prompt_ids(tok, question, fmt):
    """The prompt for `fmt`: "chat" (the chat format above) or "plain" (document boundary + plain_prompt)."""
    if fmt == "chat":
        return chat_prompt_ids(tok, question)
    return [tok.bos_id] + tok.encode(plain_prompt(question))


def example_prompt_ids(tok, ex, fmt):
    """The prompt of a loaded example (load_examples): a chat model continues the whole
    conversation before the last assistant turn; a base model sees the last question as plain text."""
    if fmt == "chat" and len(ex.get("context", ())) > 1:
        return chat_prompt_ids(tok, ex["context"])
    return prompt_ids(tok, ex["question"], fmt)


# ----------------------------------------------------------------------------------------------
# Answers and rewards

# lm-evaluation-harness's GSM8K answer filters and normalisation (lm_eval/tasks/gsm8k/gsm8k.yaml):
# strict-match = the first "#### N"; flexible-extract = the last number-looking string anywhere.
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# exact_match's regexes_to_ignore, applied in this order to prediction and reference, then lower-cased
IGNORE = [re.compile(r) for r in (",", "\\$", "(?s).*#### ", "\\.$")]


def normalize_answer(text):
    """The harness's exact_match normalisation: drop commas and '$', everything up to the last
    '#### ' (so a full GSM8K reference solution reduces to its final number), one trailing period;
    lower-case. '$1,234.' -> '1234'. No numeric canonicalisation: '3.0' stays '3.0', as in the harness."""
    text = str(text)
    for r in IGNORE:
        text = r.sub("", text)
    return text.lower()


def extract_answer(text, mode="strict"):
    """THE answer extractor (benchmarks and the GRPO reward both use it), as lm-evaluation-harness's
    GSM8K filters do it: mode "strict" takes the number after the FIRST '#### ' (strict-match), mode
    "flexible" the LAST number anywhere in the text (flexible-extract, e.g. 'The answer is 18.').
    Returns the normalised answer (normalize_answer), or None when nothing matches (the harness's
    '[invalid]', which never equals a reference)."""
    if mode == "strict":
        found = STRICT_MATCH.findall(text)
        match = found[0] if found else None
    elif mode == "flexible":
        found = FLEXIBLE_EXTRACT.findall(text)
        match = next((g for g in found[-1] if g), None) if found else None
    else:
        raise ValueError(f"extract_answer mode must be 'strict' or 'flexible', got {mode!r}")
    return None if match is None else normalize_answer(match.strip())


def exact_match_reward(completion_text, target, mode="strict"):
    """1.0 when the extracted answer equals the target (a number, or a GSM8K solution ending in
    '#### N') after the harness's normalisation, else 0.0: the reward is the benchmark's metric."""
    got = extract_answer(completion_text, mode)
    return float(got is not None and got == normalize_answer(target))


def stop_at_end(text, fmt):
    """A plain-format completion ends where the next 'Question:' would begin."""
    return text.split("\nQuestion:")[0] if fmt == "plain" else text


# ----------------------------------------------------------------------------------------------
# JSONL I/O shared by the stages

def read_jsonl(path, with_lines=False):
    """Rows of a JSONL file (with their line numbers if asked). A line that is not UTF-8 or not
    JSON ends with a clear error naming the file and line."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found")
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"error: {path}:{i} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{i} is not valid JSON ({e.msg}); fix or delete that line")
            rows.append((i, row) if with_lines else row)
    return rows


# ----------------------------------------------------------------------------------------------
# THE row loader of SFT, GRPO and eval, for training and held-out files alike.

ROW_FORMATS = ('{"question", "answer"} (GSM8K: the answer ends in "#### N"), {"question", "target"}, '
               '{"messages": [{"role": "user"|"assistant"|"system", "content"}, ...]} (optionally with "target"), '
               'or a verifiers.py row with "kind"')


def _example(row, need):
    """One JSONL row -> the normalized example, or a string saying what is wrong with it.

    Example: {"messages": the whole conversation as written (nanoforge's own format merges a system turn
              into the first user turn when rendering; a chat template renders it itself),
              "context": the turns before the last assistant turn (the prompt; for need="target", a
                         conversation that ends with a user turn is the prompt as a whole),
              "question": the last user turn's text, "answer": the last assistant turn's text or None,
              "target": the reference answer (a normalized number as text) or None,
              "kind": the verifier ("gsm8k" unless the row names another, see verifiers.py), "row": the raw row}.
    Rows of another kind (code, math, ...) are checked by verifiers.check_row and keep target None.
    need: "answer" (SFT: something to train on), "target" (GRPO / held-out: something to check against)."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list of {"role", "content"}'
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                return f'messages[{j}] must be {{"role": "user"|"assistant"|"system", "content": text}}'
            if m["role"] == "system" and j > 0:
                return f"messages[{j}] is a system message; only the first message may be one"
        raw, msgs = msgs, merge_system(msgs)  # validated merged; kept as written (a chat template renders system turns)
        if not msgs or msgs[0]["role"] != "user":
            return "the conversation must start with a user turn (after an optional system message)"
        for a, b in zip(msgs, msgs[1:]):
            if a["role"] == b["role"]:
                return f"two {a['role']} turns in a row; user and assistant turns must alternate"
        last_assistant = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if need == "target" and msgs[-1]["role"] == "user":
            last_assistant = None  # a prompt (RL / held-out) that ends with the user's turn: all of it is the prompt
        answer = msgs[last_assistant]["content"] if last_assistant is not None else None
        context = msgs[:last_assistant] if last_assistant is not None else msgs
        question = context[-1]["content"]
        if context[-1]["role"] != "user":
            return "the conversation has no user turn before its last assistant turn"
        msgs, context = raw, raw[:len(context) + len(raw) - len(msgs)]
        target = row.get("target")
    else:
        question, answer, target = row.get("question", row.get("prompt")), row.get("answer"), row.get("target")
        if not isinstance(question, str) or not question.strip():
            return 'has no "question" text' + ("" if "question" in row else f" (fields: {', '.join(row) or 'none'})")
        if answer is not None and not isinstance(answer, str):
            return '"answer" must be text'
        msgs = [{"role": "user", "content": question}] + ([{"role": "assistant", "content": answer}] if answer else [])
        context = msgs[:1]
    kind = row.get("kind", "gsm8k")
    if kind != "gsm8k":  # another verifier's row (verifiers.py's RL row format): its checks, its reward
        from verifiers import check_row
        err = check_row(row) if need == "target" else (None if answer else 'has no "answer" to train on')
        return err or {"messages": msgs, "context": context, "question": question, "answer": answer, "target": None,
                       "kind": kind, "row": row}
    if target is not None:
        norm = extract_answer(f"#### {target}")
        if norm is None:
            return f'"target" must be a number, got {str(target)[:40]!r}'
        target = norm
    elif answer is not None:
        target = extract_answer(answer)  # GSM8K: the number after '####'
    if need == "answer" and answer is None:
        return 'has nothing to train on: needs an "answer" or an assistant turn in "messages"'
    if need == "target" and target is None:
        return ('has no reference answer: needs "target", or an answer ending in "#### N"'
                if answer is not None or "target" in row else 'has no "answer" or "target" to check against')
    return {"messages": msgs, "context": context, "question": question, "answer": answer, "target": target,
            "kind": kind, "row": row}


def load_examples(path, need, what="data", min_rows=1, min_flag=None, limit=0):
    """Read and validate EVERY row of a JSONL file before anything trains on it.

    Formats: see ROW_FORMATS. need: "answer" (SFT training rows) or "target" (GRPO prompts and
    held-out problems). Bad rows are counted and the first is named (file:line, what is wrong, what
    to do) in one line; so are an empty file and fewer than `min_rows` good rows. `limit` > 0 keeps
    the first `limit` examples (after validating all of them)."""
    examples, bad, first_bad = [], 0, None
    for line, row in read_jsonl(path, with_lines=True):
        ex = _example(row, need)
        if isinstance(ex, str):
            bad += 1
            first_bad = first_bad or f"{path}:{line} {ex}"
        else:
            examples.append(ex)
    if bad:
        raise SystemExit(f"error: {bad} of {bad + len(examples)} rows of {what} file {path} are unusable; the first: "
                         f"{first_bad}. Each row must be {ROW_FORMATS}. Fix or remove those rows.")
    if len(examples) < min_rows:
        raise SystemExit(f"error: {what} file {path} has {len(examples)} usable rows; this run needs at least "
                         f"{min_rows}" + (f" ({min_flag}={min_rows})" if min_flag else "") +
                         ". Add rows" + (f" or lower {min_flag}." if min_flag else "."))
    return examples[:limit] if limit > 0 else examples


# ----------------------------------------------------------------------------------------------
# `python tasks.py`: make the embedded default's data: tokenizer, pretraining shards, SFT and RL sets.

from dataclasses import dataclass  # noqa: E402


@dataclass
class TasksConfig:
    out_dir: str = "out/data"
    n_pretrain: int = 60000   # pretraining documents (problems with PRETRAIN_TEACHER solutions)
    n_val: int = 500          # held-out problems with correct solutions: validation loss / bits per byte
    n_sft: int = 8000         # chat examples written by SFT_TEACHER
    n_rl: int = 4000          # RL prompts (train split; the reward knows the correct answer)
    n_heldout: int = 400      # held-out evaluation problems
    hard_share: float = 0.0   # share of hard-split problems in the pretraining and SFT data (0 = none)
    n_rl_hard: int = 1000     # RL prompts of the hard split (rl_hard.jsonl)
    n_heldout_hard: int = 200  # held-out hard problems (heldout_hard.jsonl)
    n_probe: int = 64         # per sub-domain: spectrum SFT's probe set (probe.jsonl, train split, correct answers)
    vocab_size: int = 512
    tokenizer: str = "bpe"    # "bpe" (trained here) or "gpt2" (tiktoken's; needs the network once)
    seed: int = 0
    code_share: float = 0.0   # share of every set made of code-output problems (the second task kind; 0 = none)


def write_jsonl(path, rows):
    from common import atomic_open
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(cfg):
    from common import progress
    from shards import write_shards
    from tokenizer import gpt2_tokenizer, train_tokenizer

    os.makedirs(cfg.out_dir, exist_ok=True)
    if not 0.0 <= cfg.code_share < 1.0:
        raise SystemExit(f"error: --code_share={cfg.code_share} must be in [0, 1)")
    if not 0.0 <= cfg.hard_share < 1.0:
        raise SystemExit(f"error: --hard_share={cfg.hard_share} must be in [0, 1)")

    def with_code(rows, seed, split, teacher=None):
        """rows with a code_share of them replaced by code-output problems (shuffled in; none at 0)."""
        n_code = round(len(rows) * cfg.code_share)
        if n_code == 0:
            return rows
        mixed = rows[:len(rows) - n_code] + make_code_split(n_code, seed, split, teacher)
        random.Random(f"mix-{split}-{seed}").shuffle(mixed)
        return mixed

    pretrain = with_hard(with_code(make_split(cfg.n_pretrain, cfg.seed, "train", PRETRAIN_TEACHER), cfg.seed, "train",
                                   PRETRAIN_CODE_TEACHER), cfg.hard_share, cfg.seed, PRETRAIN_TEACHER)
    val = with_code(make_split(cfg.n_val, cfg.seed + 1, "heldout"), cfg.seed + 1, "heldout")
    docs = [plain_document(ex) for ex in pretrain]
    if cfg.tokenizer == "gpt2":
        tok = gpt2_tokenizer()
    else:
        tok = train_tokenizer(docs, cfg.vocab_size)
    print(f"tokenizer {tok.name}: {tok.vocab_size} tokens, fingerprint {tok.fingerprint}")
    for split, rows in (("train", docs), ("val", [plain_document(ex) for ex in val])):
        ids = tok.encode_batch(list(progress(rows, desc=f"tokenize {split}", leave=False)))
        n = write_shards(ids, tok, cfg.out_dir, split)
        print(f"{split}: {len(rows)} documents, {n} tokens")
    sft = with_hard(with_code(make_split(cfg.n_sft, cfg.seed + 2, "train", SFT_TEACHER), cfg.seed + 2, "train"),
                    cfg.hard_share, cfg.seed + 2, SFT_TEACHER)
    if cfg.hard_share > 0:  # spread the appended hard problems (the default data stays exactly as it was)
        random.Random(cfg.seed + 2).shuffle(sft)
    write_jsonl(os.path.join(cfg.out_dir, "sft.jsonl"), sft)

    def rl_rows(rows):  # RL rows carry what their verifier needs (verifiers.py's row format), not the solution
        return [{k: v for k, v in ex.items() if k != "answer"} for ex in rows]

    rl = with_code(make_split(cfg.n_rl, cfg.seed + 3, "train", CORRECT_TEACHER), cfg.seed + 3, "train",
                   CORRECT_CODE_TEACHER)
    write_jsonl(os.path.join(cfg.out_dir, "rl.jsonl"), rl_rows(rl))
    write_jsonl(os.path.join(cfg.out_dir, "heldout.jsonl"),
                with_code(make_split(cfg.n_heldout, cfg.seed + 4, "heldout"), cfg.seed + 4, "heldout"))
    # the hard split (the L20-Edu failure mode) and spectrum SFT's probe set, one block per sub-domain
    write_jsonl(os.path.join(cfg.out_dir, "rl_hard.jsonl"),
                rl_rows(make_split(cfg.n_rl_hard, cfg.seed + 3, "train", CORRECT_TEACHER, kind="hard")))
    write_jsonl(os.path.join(cfg.out_dir, "heldout_hard.jsonl"),
                make_split(cfg.n_heldout_hard, cfg.seed + 4, "heldout", kind="hard"))
    probe = [ex for kind in KINDS for ex in make_split(cfg.n_probe, cfg.seed + 5, "train", CORRECT_TEACHER, kind=kind)]
    write_jsonl(os.path.join(cfg.out_dir, "probe.jsonl"), rl_rows(probe))
    # bits per byte needs the raw text of the validation documents
    write_jsonl(os.path.join(cfg.out_dir, "val_text.jsonl"), [{"text": plain_document(ex)} for ex in val])
    print(f"wrote {cfg.out_dir}: shards, sft.jsonl ({cfg.n_sft}), rl.jsonl ({cfg.n_rl}), heldout.jsonl ({cfg.n_heldout})")


if __name__ == "__main__":
    from common import parse_config
    main(parse_config(TasksConfig()))
