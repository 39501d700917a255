"""
Benchmarks: the zero-shot harness (HellaSwag, ARC-Easy/Challenge, PIQA, WinoGrande, OpenBookQA,
LAMBADA, MMLU) and GSM8K by generation, scored the way EleutherAI's lm-evaluation-harness scores
them, plus the registry of evaluation sets that dedup.py decontaminates against.

    python eval.py --ckpts=out/pretrain,out/sft --tasks=l20,gsm8k --limit=200

How the harness scores a multiple-choice item (lm_eval/api/task.py, lm_eval/api/model.py), and here:
1. The task's YAML turns a document into a context string and one continuation per choice
   (target_delimiter " " + choice). `FORMATS` below holds those templates, each beside its YAML path.
2. `_encode_pair`: trailing spaces of the context move to the continuation; the context is tokenized
   alone, the continuation is what remains of tokenizing context + continuation together:
   cont_ids = enc(ctx + cont)[len(enc(ctx)):]. For a byte-level BPE whose pre-tokenizer splits before
   " word" this is almost always enc(cont); where a merge crosses the boundary the harness's rule
   (kept here exactly) decides. nanoforge models are trained with <|bos|> at the start of every
   document, so the context gets <|bos|> first (the harness's `add_bos_token=True`); tokenizers without
   a BOS id get none (the harness's default for causal models).
3. The score of a choice is the sum of log p(continuation tokens | context), truncated on the left to
   max_seq_len + 1 tokens as the harness does. acc = argmax of the sums; acc_norm = argmax of
   sum / len(choice in characters) (`completion_len` in task.py; the choice string without the
   delimiter). LAMBADA: acc = every continuation token is the greedy argmax; perplexity =
   exp(-mean over items of the continuation's log-likelihood).
4. WinoGrande (partial scoring): one context per option (the sentence up to the blank with the
   option filled in) and ONE shared continuation (the rest of the sentence): only that is scored.

Speed: the harness runs one forward per (context, continuation) pair. Here all sequences of one item
share their common token prefix (the context, or for WinoGrande the words before the blank): an item
becomes one packed row [prefix | branch 1 | branch 2 | ...] where each branch attends to the prefix and
to itself only (a tree mask), with positions restarting after the prefix, so each branch computes
exactly what it would alone. Rows are sorted by length and batched under a token budget; only the
positions that score a token go through the output layer. `score_unbatched` is the plain
one-forward-per-choice reference the tests and bench/benchmarks.py compare against.

GSM8K (lm_eval/tasks/gsm8k/gsm8k.yaml): greedy generation, stop strings "Question:", "</s>",
"<|im_end|>" (plus the model's own end token; the engine stops a row as soon as its text holds one, and the
text is cut before it), up to 256 new tokens; base models get the 5-shot
"Question: ...\\nAnswer: <solution>\\n\\n" prompt with shots drawn as the harness draws them
(random.Random(1234).sample(train, 5) per test item, in order); chat models get the question zero-shot
in a user turn. strict-match / flexible-extract are tasks.extract_answer. With --gsm8k_samples=n > 0,
n samples per problem give mean@n (pass@1 averaged over the samples, ProRL) and unbiased pass@k.
"""
import csv
import fnmatch
import glob
import json
import math
import os
import random
import re
import time

import torch
import torch.nn.functional as F

from common import progress as progress_bar

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "..", "shared", "data")

# ----------------------------------------------------------------------------------------------
# The registry of evaluation sets, used by the benchmarks here and by dedup.py's decontamination, so a
# set added for evaluation is decontaminated against automatically. name -> (local globs under the data
# folder (the layout of ../shared/data), hub repo, glob over the repo's files); the harness's
# dataset_path is the hub repo. Benchmarks score the FIRST local glob only; further globs are there for
# decontamination (PIQA's test split has no labels, but a leak of it is still a leak).

EVAL_SETS = {
    "gsm8k": (("gsm8k/test.jsonl",), "openai/gsm8k", "main/test-*.parquet"),
    "arc_easy": (("arc_easy/ARC-Easy-Test.jsonl",), "allenai/ai2_arc", "ARC-Easy/test-*.parquet"),
    "arc_challenge": (("arc_challenge/ARC-Challenge-Test.jsonl",), "allenai/ai2_arc", "ARC-Challenge/test-*.parquet"),
    "hellaswag": (("hellaswag/hellaswag_val*.jsonl",), "Rowan/hellaswag", "data/validation-*.parquet"),
    "mmlu": (("mmlu/test/*.csv",), "cais/mmlu", "all/test-*.parquet"),
    "piqa": (("piqa/valid.jsonl", "piqa/tests.jsonl"), "baber/piqa", "data/validation-*.parquet"),
    "winogrande": (("winogrande/dev.jsonl",), "allenai/winogrande", "winogrande_xl/validation-*.parquet"),
    "openbookqa": (("openbookqa/openbook_qa*.jsonl",), "allenai/openbookqa", "main/test-*.parquet"),
    "lambada_openai": (("lambada_openai/lambada_openai*.jsonl",), "EleutherAI/lambada_openai", "default/test-*.parquet"),
    "boolq": (("boolq/boolq*.jsonl",), "google/boolq", "data/validation-*.parquet"),
    "sciq": (("sciq/test.json",), "allenai/sciq", "data/test-*.parquet"),
    "commonsenseqa": (("commonsenseqa/dev_rand_split.jsonl",), "tau/commonsense_qa", "data/validation-*.parquet"),
    "siqa": (("siqa/dev.jsonl",), None, None),
}
# Few-shot pools: read the same way, but training data, so never decontaminated against.
FEWSHOT_SETS = {"gsm8k_train": (("gsm8k/train.jsonl",), "openai/gsm8k", "main/train-*.parquet")}

MC_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "lambada_openai", "mmlu"]
TASKS = MC_TASKS + ["gsm8k"]
# The L20-Edu report's six-task zero-shot mean.
TASK_SETS = {"l20": ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa"]}
# The number each task contributes to the table and to the means: acc_norm where the harness reports
# it (the figure papers quote for these tasks), else acc; GSM8K strict-match exact match.
HEADLINE = {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
            "openbookqa": "acc_norm", "winogrande": "acc", "lambada_openai": "acc", "mmlu": "acc",
            "gsm8k": "exact_match,strict-match"}


def parse_tasks(spec):
    """'l20,gsm8k' -> (['hellaswag', ..., 'gsm8k'], {'l20': [...]}). Unknown names: one clear line."""
    names, sets = [], {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in TASK_SETS:
            sets[name] = TASK_SETS[name]
            names += TASK_SETS[name]
        elif name in TASKS:
            names.append(name)
        else:
            raise SystemExit(f"error: unknown task '{name}' in --tasks. Known tasks: {' '.join(TASKS)}; "
                             f"sets: {' '.join(TASK_SETS)}")
    return list(dict.fromkeys(names)), sets


# ----------------------------------------------------------------------------------------------
# Reading: local files in their original (or the shared folder's reformatted) layouts, or the Hub's
# parquet files. Every reader yields (row_number, raw dict); `to_doc` turns a raw row of either layout
# into the field layout the harness's YAML reads (the Hub's), or raises on a malformed row.

def _hub():
    import huggingface_hub
    return huggingface_hub


def download_eval_set(name, cache_dir, hub=None):
    """The Hub files of an eval set, downloaded once into cache_dir/<name>/ (hf_hub_download caches)."""
    _, repo, pattern = {**EVAL_SETS, **FEWSHOT_SETS}[name]
    if repo is None:
        return []
    hub = hub or _hub()
    files = sorted(f for f in hub.list_repo_files(repo, repo_type="dataset") if fnmatch.fnmatch(f, pattern))
    return [hub.hf_hub_download(repo, f, repo_type="dataset", local_dir=os.path.join(cache_dir, name)) for f in files]


def local_eval_files(name, data_dir, scored_only=False):
    """Every local file of an eval set (for decontamination), or those of its first glob (scored)."""
    globs = {**EVAL_SETS, **FEWSHOT_SETS}[name][0]
    return sorted(f for pattern in globs[:1 if scored_only else None] for f in glob.glob(os.path.join(data_dir, pattern)))


def find_eval_files(name, data_dir=DEFAULT_DATA_DIR, cache_dir="out/hf_datasets", hub=None):
    """Local files of an eval set, else its Hub download. A set that is neither: one clear line."""
    local = {**EVAL_SETS, **FEWSHOT_SETS}[name][0][0]
    files = local_eval_files(name, data_dir, scored_only=True)
    if files:
        return files
    try:
        files = download_eval_set(name, cache_dir, hub)
    except Exception as e:
        raise SystemExit(f"error: eval set {name}: no {local} under {data_dir} and the Hugging Face "
                         f"Hub is unreachable ({type(e).__name__}). Pass --benchmark_dir=<folder with that layout>, "
                         f"or run once with a network")
    if not files:
        raise SystemExit(f"error: eval set {name}: no {local} under {data_dir} and nothing to download "
                         f"for it; pass --benchmark_dir=<folder with that layout>")
    return files


def _labels_beside(path):
    """PIQA / WinoGrande ship labels in <split>-labels.lst beside <split>.jsonl (one per line)."""
    lst = path[:-len(".jsonl")] + "-labels.lst"
    if not os.path.exists(lst):
        return None
    with open(lst) as f:
        return [line.strip() for line in f]


def read_raw_rows(path):
    """(row number, dict or list) for each row of .jsonl / .json array / header-less .csv / .parquet.
    A line that is not JSON comes back as (row number, None) so the caller counts it as malformed."""
    if path.endswith(".csv"):  # MMLU: question, A, B, C, D, answer letter; subject from the file name
        subject = os.path.basename(path).rsplit("_", 1)[0]
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), 1):
                yield i, {"_csv": row, "subject": subject}
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        yield from enumerate(pq.read_table(path).to_pylist(), 1)
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            yield from enumerate(json.load(f), 1)
            return
        labels = _labels_beside(path)
        n = 0
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if labels is not None and isinstance(row, dict) and "label" not in row and "answer" not in row:
                row["label"] = labels[n] if n < len(labels) else None
            n += 1
            yield i, row


# ----------------------------------------------------------------------------------------------
# What decontamination indexes (dedup.py): the texts of each eval item that a leak would copy.

def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _choice_texts(c):
    """Answer options in the layouts the sets use: ["a", ...], {"text": [...]}, [{"text": "a"}, ...]."""
    if isinstance(c, dict):
        c = c.get("text", [])
    return [x["text"] if isinstance(x, dict) else x for x in (c or []) if isinstance(x, (str, dict))]


def item_texts(row):
    """The texts of one eval item that a leak would copy, each indexed on its own: the question; the
    question followed by each answer option; passages and solutions on their own; WinoGrande's
    sentence with its blank filled by each option; LAMBADA's passage with its last word. Rows of
    unknown layout: every string field on its own, and all of them joined."""
    if not isinstance(row, dict):
        return []
    if "_csv" in row:  # MMLU csv (read_raw_rows): question, A, B, C, D, answer letter
        q, options = row["_csv"][0], row["_csv"][1:-1]
        return [q] + [f"{q} {o}" for o in options]
    if "sentence" in row and "option1" in row:  # WinoGrande
        return [row["sentence"].replace("_", row[k], 1) for k in ("option1", "option2") if isinstance(row.get(k), str)]
    if "continuation" in row and "context" in row:  # LAMBADA (llm-foundry layout)
        return [f"{row['context']} {row['continuation']}"]
    q = row.get("question")
    options = []
    if isinstance(q, dict):  # ARC: question = {stem, choices}
        q, options = q.get("stem", ""), _choice_texts(q.get("choices"))
    q = q or row.get("question_stem") or row.get("goal") or row.get("ctx") or row.get("query") or ""
    passages = []
    if q.startswith("Passage: ") and "\nQuestion: " in q:  # BoolQ (llm-foundry layout)
        passage, q = q[len("Passage: "):].split("\nQuestion: ", 1)
        passages.append(passage)
    if isinstance(row.get("context"), str):  # Social IQa: context, question
        q = f"{row['context']} {q}"
    options = options or _choice_texts(row.get("choices")) or _choice_texts(row.get("endings")) \
        or _choice_texts(row.get("options"))
    options += [row[k] for k in ("sol1", "sol2", "correct_answer", "distractor1", "distractor2", "distractor3")
                if isinstance(row.get(k), str)]
    for k in ("answer", "support", "passage", "text"):  # GSM8K solutions, SciQ support, BoolQ passage, LAMBADA
        if isinstance(row.get(k), str) and len(row[k].split()) > 3:
            passages.append(row[k])
    if not q and not passages:
        strings = [s for s in _strings(row) if s.strip()]
        return strings + [" ".join(strings)]
    texts = [q] + [f"{q} {o}" for o in options] if q else []
    return texts + passages


def eval_item_texts(files):
    """One list of texts per eval item of the given files (see item_texts)."""
    for path in files:
        for _, row in read_raw_rows(path):
            texts = [t for t in item_texts(row) if t and t.strip()]
            if texts:
                yield texts


LETTERS = "ABCDEFGHIJ"


def to_doc(task, r):
    """A raw row of either layout -> the harness's document for `task`. KeyError/ValueError/TypeError/
    IndexError on a malformed row."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    if task in ("arc_easy", "arc_challenge"):
        q = r["question"]
        if isinstance(q, dict):  # original AI2 jsonl: question{stem, choices[{text, label}]}
            ch = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
            q = q["stem"]
        else:
            ch = {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])}
        doc = {"question": str(q), "choices": ch, "answerKey": str(r["answerKey"])}
        doc["choices"]["label"].index(doc["answerKey"])  # numeric labels "1".."4" map the same way
        if len(ch["text"]) < 2 or not all(isinstance(t, str) for t in ch["text"]):
            raise ValueError("fewer than 2 text choices")
        return doc
    if task == "hellaswag":
        doc = {"activity_label": str(r["activity_label"]), "endings": list(r["endings"]), "label": int(r["label"])}
        if "ctx_a" in r:
            doc["ctx_a"], doc["ctx_b"] = str(r["ctx_a"]), str(r["ctx_b"])
        else:  # the shared folder's re-export keeps only ctx = ctx_a + " " + ctx_b (ctx_b not capitalised)
            doc["ctx"] = str(r["ctx"])
        if len(doc["endings"]) != 4 or not 0 <= doc["label"] < 4:
            raise ValueError("needs 4 endings and a label 0-3")
        return doc
    if task == "piqa":
        doc = {"goal": str(r["goal"]), "sol1": str(r["sol1"]), "sol2": str(r["sol2"]), "label": int(r["label"])}
        if doc["label"] not in (0, 1):
            raise ValueError(f"label {doc['label']} is not 0/1")
        return doc
    if task == "winogrande":
        doc = {"sentence": str(r["sentence"]), "option1": str(r["option1"]), "option2": str(r["option2"]),
               "answer": str(r.get("answer", r.get("label")))}
        if doc["answer"] not in ("1", "2") or "_" not in doc["sentence"]:
            raise ValueError("needs answer '1'/'2' and a '_' in the sentence")
        return doc
    if task == "openbookqa":
        if "query" in r:  # llm-foundry's reformat: query (= question_stem), choices[4], gold
            texts, gold = list(r["choices"]), int(r["gold"])
            doc = {"question_stem": str(r["query"]), "choices": {"text": texts, "label": list(LETTERS[:len(texts)])},
                   "answerKey": LETTERS[gold]}
        else:
            doc = {"question_stem": str(r["question_stem"]),
                   "choices": {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])},
                   "answerKey": str(r["answerKey"])}
        doc["choices"]["label"].index(doc["answerKey"].lstrip())
        return doc
    if task == "lambada_openai":
        if "text" in r:
            text = str(r["text"])
        else:  # llm-foundry's split: context + " " + last word
            text = str(r["context"]) + " " + str(r["continuation"]).strip()
        if " " not in text.strip():
            raise ValueError("text has no last word to predict")
        return {"text": text}
    if task == "mmlu":
        if "_csv" in r:
            row = r["_csv"]
            if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                raise ValueError("expected 6 CSV fields ending in a letter A-D")
            return {"question": row[0], "subject": r["subject"], "choices": row[1:5], "answer": "ABCD".index(row[5].strip())}
        doc = {"question": str(r["question"]), "subject": str(r["subject"]), "choices": list(r["choices"]),
               "answer": int(r["answer"])}
        if len(doc["choices"]) != 4 or not 0 <= doc["answer"] < 4:
            raise ValueError("needs 4 choices and an answer 0-3")
        return doc
    if task in ("gsm8k", "gsm8k_train"):
        doc = {"question": str(r["question"]), "answer": str(r["answer"])}
        if "####" not in doc["answer"]:
            raise ValueError("answer has no '#### N'")
        return doc
    raise ValueError(f"no reader for task {task}")


def load_docs(task, data_dir=DEFAULT_DATA_DIR, cache_dir="out/hf_datasets", hub=None, limit=0, log=print):
    """The harness documents of a task, in file order (`limit` keeps the first N, as --limit does in the
    harness; MMLU is a group of 57 subject tasks in the harness, and its --limit applies to each subject,
    so here too: the first N items of every subject). Malformed rows are counted, skipped and reported
    in one line, never scored."""
    docs, bad, first_bad = [], 0, None
    for path in find_eval_files(task, data_dir, cache_dir, hub):
        for i, row in read_raw_rows(path):
            try:
                docs.append(to_doc(task, row))
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                bad += 1
                first_bad = first_bad or f"{path}:{i} ({type(e).__name__}: {e})"
    if bad:
        log(f"warning: {task}: skipped {bad} malformed row(s) of {bad + len(docs)}, first at {first_bad}; "
            f"they are not scored. Fix or delete them to score the full set.")
    if not docs:
        raise SystemExit(f"error: {task}: no readable rows in {find_eval_files(task, data_dir, cache_dir, hub)}")
    if task == "mmlu":  # the harness runs the subjects in alphabetical order, each limited on its own
        docs.sort(key=lambda d: d["subject"])  # stable: file order within a subject
        if limit:
            kept, per_subject = [], {}
            for d in docs:
                per_subject[d["subject"]] = per_subject.get(d["subject"], 0) + 1
                if per_subject[d["subject"]] <= limit:
                    kept.append(d)
            docs = kept
        return docs
    return docs[:limit] if limit else docs


# ----------------------------------------------------------------------------------------------
# Formats: a harness document -> the strings the harness scores. Each returns a request dict:
# contexts (one per choice), continuations (one per choice), choices (for acc_norm's lengths), gold.

def hellaswag_preprocess(text):
    # lm_eval/tasks/hellaswag/utils.py preprocess
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _mc(context, choices, gold, delimiter=" "):
    return {"contexts": [context] * len(choices), "continuations": [delimiter + c for c in choices],
            "choices": list(choices), "gold": gold}


def fmt_hellaswag(d):
    # lm_eval/tasks/hellaswag/hellaswag.yaml + utils.py process_docs: activity_label: ctx_a ctx_b.capitalize()
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize() if "ctx_a" in d else d["ctx"]
    return _mc(hellaswag_preprocess(d["activity_label"] + ": " + ctx),
               [hellaswag_preprocess(e) for e in d["endings"]], d["label"])


def fmt_arc(d):
    # lm_eval/tasks/arc/arc_easy.yaml (arc_challenge.yaml includes it): "Question: {{question}}\nAnswer:"
    return _mc(f"Question: {d['question']}\nAnswer:", d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))


def fmt_piqa(d):
    # lm_eval/tasks/piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2]
    return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])


def fmt_openbookqa(d):
    # lm_eval/tasks/openbookqa/openbookqa.yaml: doc_to_text question_stem, choices choices.text
    return _mc(d["question_stem"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"].lstrip()))


def fmt_winogrande(d):
    # lm_eval/tasks/winogrande/preprocess_winogrande.py: partial scoring. The contexts are the sentence
    # up to the blank with each option filled in; the continuation (target) is the rest, shared.
    idx = d["sentence"].index("_")
    contexts = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
    target = d["sentence"][idx + 1:].strip()
    return {"contexts": contexts, "continuations": [" " + target] * 2, "choices": [d["option1"], d["option2"]],
            "gold": {"1": 0, "2": 1}[d["answer"]]}


def fmt_lambada(d):
    # lm_eval/tasks/lambada/lambada_openai.yaml: text.split(' ')[:-1]|join(' ') and ' ' + last word
    words = d["text"].split(" ")
    return {"contexts": [" ".join(words[:-1])], "continuations": [" " + words[-1]], "choices": [words[-1]], "gold": 0}


def fmt_mmlu(d):
    # lm_eval/tasks/mmlu/default/_default_template_yaml + mmlu_<subject>.yaml's description
    desc = f"The following are multiple choice questions (with answers) about {d['subject'].replace('_', ' ')}.\n\n"
    c = d["choices"]
    text = f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return _mc(desc + text, ["A", "B", "C", "D"], d["answer"])


FORMATS = {"hellaswag": fmt_hellaswag, "arc_easy": fmt_arc, "arc_challenge": fmt_arc, "piqa": fmt_piqa,
           "openbookqa": fmt_openbookqa, "winogrande": fmt_winogrande, "lambada_openai": fmt_lambada,
           "mmlu": fmt_mmlu}


def gsm8k_fewshot_prompt(doc, shots):
    # lm_eval/tasks/gsm8k/gsm8k.yaml: doc_to_text "Question: {{question}}\nAnswer:", target " {{answer}}",
    # fewshot_delimiter "\n\n" (task.py build_qa_turn)
    return "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + \
        f"Question: {doc['question']}\nAnswer:"


def gsm8k_shots(n_docs, train, k=5, seed=1234):
    """The harness's default sampler: one random.Random(fewshot seed 1234) drawing rnd.sample(train, k)
    for each test document in order (lm_eval/api/samplers.py ContextSampler; the train split is not the
    test split, so no eval-doc removal)."""
    rnd = random.Random(seed)
    return [rnd.sample(train, k) for _ in range(n_docs)]


GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]  # gsm8k.yaml generation_kwargs.until


# ----------------------------------------------------------------------------------------------
# Tokenization (the harness's _encode_pair) and scoring

def encode_pair(tok, context, continuation, add_bos=True):
    """(context ids, continuation ids) as lm_eval/api/model.py _encode_pair makes them for a causal LM."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    bos = [tok.bos_id] if add_bos and getattr(tok, "bos_id", None) is not None else []
    return bos + ctx, whole[len(ctx):]


def item_sequences(tok, req, max_len, add_bos=True):
    """Per choice: (tokens, n_context) with tokens = context + continuation truncated on the left to
    max_len + 1 tokens (the harness's `(context_enc + continuation_enc)[-(max_length + 1):]`)."""
    out = []
    for ctx, cont in zip(req["contexts"], req["continuations"]):
        c, k = encode_pair(tok, ctx, cont, add_bos)
        seq = (c + k)[-(max_len + 1):]
        out.append((seq, len(seq) - len(k)))
    return out


def _pack(seqs):
    """One item's sequences as a tree: (tokens, positions, owner, score index lists, targets).
    The inputs are seq[:-1]; their longest common prefix is stored once (owner -1), then each
    sequence's remaining inputs as a branch (owner j) at positions continuing the prefix."""
    inputs = [s[:-1] for s, _ in seqs]
    p = min(len(x) for x in inputs)
    for x in inputs[1:]:
        p = next((i for i in range(p) if x[i] != inputs[0][i]), p)
    tokens, positions, owner = list(inputs[0][:p]), list(range(p)), [-1] * p
    where, targets = [], []
    for j, ((seq, n_ctx), x) in enumerate(zip(seqs, inputs)):
        start = len(tokens)
        tokens += x[p:]
        positions += range(p, len(x))
        owner += [j] * (len(x) - p)
        # the token at seq index t + 1 is predicted from input index t; score t = n_ctx - 1 .. len(seq) - 2
        where.append([t if t < p else start + t - p for t in range(n_ctx - 1, len(seq) - 1)])
        targets.append(seq[n_ctx:])
    return tokens, positions, owner, where, targets


class _TreeAttention:
    """Stands where generation's KV cache stands in model.Attention: every layer attends with the packed
    rows' tree mask (True = attend) instead of a causal one. Nothing is cached."""

    def __init__(self, mask):
        self.mask = mask

    def __getitem__(self, layer):
        return self

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=q.size(1) != k.size(1))


def _tree_hidden_states(model, idx, pos, mask):
    # model.Attention attends through the cache object it is given (engine.py's KVCache in generation)
    return model.hidden_states(idx, pos, _TreeAttention(mask))


@torch.no_grad()
def score_items(model, tok, reqs, add_bos=True, max_batch_tokens=8192, desc=None, progress=True):
    """Batched scoring. reqs: request dicts (see FORMATS). -> per item a list over choices of
    (sum of continuation log-probs, all continuation tokens greedy, number of continuation tokens)."""
    device = model.embed.weight.device
    max_len = model.cfg.max_seq_len
    packed = [_pack(item_sequences(tok, r, max_len, add_bos)) for r in reqs]
    order = sorted(range(len(packed)), key=lambda i: -len(packed[i][0]))
    results = [None] * len(reqs)
    batches, s = [], 0
    while s < len(order):  # longest first, so each batch's first row sets its length
        n = max(1, max_batch_tokens // len(packed[order[s]][0]))
        batches.append(order[s:s + n])
        s += n
    bar = progress_bar(total=len(reqs), desc=desc, leave=False, disable=not progress)
    W = model.lm_head_weight
    for batch in batches:
        L = max(len(packed[i][0]) for i in batch)
        B = len(batch)
        idx = torch.zeros(B, L, dtype=torch.long)
        pos = torch.zeros(B, L, dtype=torch.long)
        own = torch.full((B, L), -2, dtype=torch.long)  # -2: padding
        for b, i in enumerate(batch):
            tokens, positions, owner, _, _ = packed[i]
            n = len(tokens)
            idx[b, :n], pos[b, :n], own[b, :n] = torch.tensor(tokens), torch.tensor(positions), torch.tensor(owner)
        ar = torch.arange(L)
        causal = ar[None, :, None] >= ar[None, None, :]
        oq, ok = own[:, :, None], own[:, None, :]
        mask = causal & ((ok == -1) | (ok == oq)) & (ok != -2)
        mask = mask | torch.eye(L, dtype=torch.bool)[None]  # padded queries see themselves: no NaN, never read
        h = _tree_hidden_states(model, idx.to(device), pos.to(device), mask[:, None].to(device))
        flat_pos, flat_tgt = [], []
        for b, i in enumerate(batch):
            for w, t in zip(packed[i][3], packed[i][4]):
                flat_pos += [b * L + x for x in w]
                flat_tgt += t
        hs = h.reshape(B * L, -1)[torch.tensor(flat_pos, device=device)]
        tgt = torch.tensor(flat_tgt, device=device)
        lps, greedy = [], []
        for s in range(0, len(flat_pos), 2048):  # bounded (positions x vocab) logits
            logits = F.linear(hs[s:s + 2048], W).float().log_softmax(-1)
            lps.append(logits.gather(1, tgt[s:s + 2048, None])[:, 0])
            greedy.append(logits.argmax(-1) == tgt[s:s + 2048])
        lp, gr = torch.cat(lps).double().cpu(), torch.cat(greedy).cpu()
        k = 0
        for i in batch:
            res = []
            for t in packed[i][4]:
                res.append((float(lp[k:k + len(t)].sum()), bool(gr[k:k + len(t)].all()), len(t)))
                k += len(t)
            results[i] = res
        bar.update(B)
    bar.close()
    return results


@torch.no_grad()
def score_unbatched(model, tok, reqs, add_bos=True):
    """The straightforward reference: one forward per (context, continuation), as the harness does
    it (without its batching). Same output as score_items."""
    device = model.embed.weight.device
    out = []
    for r in reqs:
        res = []
        for seq, n_ctx in item_sequences(tok, r, model.cfg.max_seq_len, add_bos):
            x = torch.tensor(seq[:-1], device=device)[None]
            logp = model(x)[0].float().log_softmax(-1)
            tgt = torch.tensor(seq[n_ctx:], device=device)
            lp = logp[n_ctx - 1:].gather(1, tgt[:, None])[:, 0]
            res.append((float(lp.double().sum()), bool((logp[n_ctx - 1:].argmax(-1) == tgt).all()), len(tgt)))
        out.append(res)
    return out


def mc_metrics(req, scores):
    """The harness's multiple_choice process_results: acc, acc_norm (log-likelihood / characters)."""
    lls = [s[0] for s in scores]
    pred = max(range(len(lls)), key=lambda j: (lls[j], -j))  # np.argmax: the first of equal maxima
    norm = [ll / len(c) if len(c) else float("-inf") for ll, c in zip(lls, req["choices"])]
    pred_norm = max(range(len(norm)), key=lambda j: (norm[j], -j))
    return {"acc": float(pred == req["gold"]), "acc_norm": float(pred_norm == req["gold"]),
            "pred": pred, "pred_norm": pred_norm}


def run_mc_task(model, tok, task, docs, add_bos=True, max_batch_tokens=8192, progress=True, log=print):
    """Score one multiple-choice / cloze task. -> (metrics dict, per-item records)."""
    reqs = [FORMATS[task](d) for d in docs]
    t0 = time.time()
    scores = score_items(model, tok, reqs, add_bos, max_batch_tokens, desc=task, progress=progress)
    dt = time.time() - t0
    items = []
    for n, (d, r, s) in enumerate(zip(docs, reqs, scores)):
        rec = {"i": n, "gold": r["gold"], "scores": [round(x[0], 6) for x in s],
               "choice_chars": [len(c) for c in r["choices"]]}
        if task == "lambada_openai":
            rec.update(acc=float(s[0][1]), ll=s[0][0], pred=0 if s[0][1] else None)
        else:
            m = mc_metrics(r, s)
            rec.update(m)
        if task == "mmlu":
            rec["subject"] = d["subject"]
        items.append(rec)
    n = len(items)
    metrics = {"n": n, "acc": sum(r["acc"] for r in items) / n}
    if task == "lambada_openai":
        metrics["perplexity"] = math.exp(-sum(r["ll"] for r in items) / n)
    elif task not in ("winogrande", "mmlu"):
        metrics["acc_norm"] = sum(r["acc_norm"] for r in items) / n
    if task == "mmlu":  # micro = over items (the harness's group figure, weight_by_size); macro = over subjects
        subj = {}
        for r in items:
            subj.setdefault(r["subject"], []).append(r["acc"])
        metrics["acc_macro"] = sum(sum(v) / len(v) for v in subj.values()) / len(subj)
        metrics["n_subjects"] = len(subj)
        metrics["subjects"] = {k: sum(v) / len(v) for k, v in sorted(subj.items())}
    metrics["items_per_s"] = n / dt if dt > 0 else float("inf")
    metrics["seconds"] = round(dt, 2)
    log(f"{task}: {n} items, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                            if k in ("acc", "acc_norm", "acc_macro", "perplexity"))
        + f", {metrics['items_per_s']:.1f} items/s")
    return metrics, items


# ----------------------------------------------------------------------------------------------
# GSM8K by generation

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    as a running product so large n stays exact in floating point."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def cut_at_stop(text, stops):
    """The harness's `until`: the generation ends before the first stop string."""
    for s in stops:
        if s in text:
            text = text.split(s)[0]
    return text


def generate_texts(model, prompts, stop_ids, max_new_tokens, temperature, batch_size, seed, n=1, desc=None,
                   progress=True, stop_strings=(), decode=None):
    """The one place benchmarks sample from a model: prompts (token id lists) -> for each prompt, n
    completions (token ids, stop token included). A row also stops once its text holds one of
    stop_strings (the harness's `until`; decode turns ids into text). Prompts are sorted by length so
    each batch pads little; the result is in the input's order."""
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    bar = progress_bar(total=len(prompts), desc=desc, leave=False, disable=not progress)
    step = max(1, batch_size // n)
    for s in range(0, len(order), step):
        chunk = order[s:s + step]
        for i, samples in zip(chunk, _sample(model, [prompts[i] for i in chunk], n, stop_ids, max_new_tokens,
                                             temperature, gen, stop_strings, decode)):
            out[i] = samples
        bar.update(len(chunk))
    bar.close()
    return out


def _sample(model, prompts, n, stop_ids, max_new_tokens, temperature, gen, stop_strings=(), decode=None):
    from engine import Engine  # THE sampling engine: n samples share their prompt's prefill
    out = Engine(model, max_batch=len(prompts) * n).generate(prompts, n=n, max_new_tokens=max_new_tokens,
                                                              stop_tokens=stop_ids, temperature=temperature,
                                                              generator=gen, stop_strings=stop_strings,
                                                              decode=decode)
    return [[s.tokens for s in group] for group in out]


def gsm8k_prompt_ids(tok, doc, shots, fmt, max_len, max_new_tokens, add_bos=True):
    """Prompt ids for one problem; a base model's 5-shot prompt is cut on the left to leave room for
    max_new_tokens (the harness keeps the last max_length - max_gen_toks context tokens)."""
    if fmt == "chat":
        from tasks import chat_prompt_ids
        ids = chat_prompt_ids(tok, f"Question: {doc['question']}\nAnswer:")
    else:
        bos = [tok.bos_id] if add_bos and getattr(tok, "bos_id", None) is not None else []
        ids = bos + tok.encode(gsm8k_fewshot_prompt(doc, shots))
    return ids[-(max_len - max_new_tokens):]


def run_gsm8k(model, tok, docs, train, fmt="plain", add_bos=True, max_new_tokens=256, batch_size=64,
              n_samples=0, temperature=1.0, k_list=(1, 8), seed=0, progress=True, log=print):
    """GSM8K by greedy generation (strict-match and flexible-extract exact match), plus, with
    n_samples > 0, mean@n and unbiased pass@k over n samples per problem."""
    from tasks import extract_answer, normalize_answer
    shots = gsm8k_shots(len(docs), train) if fmt != "chat" else [[] for _ in docs]
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len // 2)
    prompts = [gsm8k_prompt_ids(tok, d, s, fmt, model.cfg.max_seq_len, max_new_tokens, add_bos)
               for d, s in zip(docs, shots)]
    stop_ids = list(getattr(tok, "stop_ids", None) or [tok.end_id]) if fmt == "chat" else \
        [i for i in [getattr(tok, "bos_id", None)] if i is not None]
    stops = GSM8K_STOP + (["<|end|>"] if fmt == "chat" else [])
    t0 = time.time()
    greedy = generate_texts(model, prompts, stop_ids, max_new_tokens, 0.0, batch_size, seed, 1, "gsm8k", progress,
                            stops, tok.decode)
    texts = [cut_at_stop(tok.decode(g[0]), stops) for g in greedy]
    items, strict, flex = [], 0, 0
    for n, (d, t) in enumerate(zip(docs, texts)):
        gold = normalize_answer(d["answer"])
        s, f = extract_answer(t, "strict"), extract_answer(t, "flexible")
        strict += s == gold
        flex += f == gold
        items.append({"i": n, "gold": gold, "completion": t, "strict": s, "flexible": f,
                      "strict_correct": s == gold, "flexible_correct": f == gold})
    N = len(docs)
    metrics = {"n": N, "exact_match,strict-match": strict / N, "exact_match,flexible-extract": flex / N}
    if n_samples > 0:
        samp = generate_texts(model, prompts, stop_ids, max_new_tokens, temperature, batch_size, seed + 1,
                              n_samples, "gsm8k samples", progress, stops, tok.decode)
        for n, it in enumerate(items):
            outs = [cut_at_stop(tok.decode(g), stops) for g in samp[n]]
            c = sum(extract_answer(o, "strict") == it["gold"] for o in outs)
            it["samples_correct"] = c
        metrics[f"mean@{n_samples}"] = sum(it["samples_correct"] for it in items) / (N * n_samples)
        for k in k_list:
            if k <= n_samples:
                metrics[f"pass@{k}"] = sum(pass_at_k(n_samples, it["samples_correct"], k) for it in items) / N
    dt = time.time() - t0
    metrics["items_per_s"] = N / dt if dt > 0 else float("inf")
    metrics["seconds"] = round(dt, 2)
    metrics["format"] = "5-shot base" if fmt != "chat" else "0-shot chat"
    log(f"gsm8k ({metrics['format']}): {N} problems, strict-match {metrics['exact_match,strict-match']:.4f}, "
        f"flexible-extract {metrics['exact_match,flexible-extract']:.4f}, {metrics['items_per_s']:.2f} problems/s")
    return metrics, items


# ----------------------------------------------------------------------------------------------
# One checkpoint, many tasks; the table across checkpoints

def run_tasks(model, tok, names, *, fmt="plain", data_dir=DEFAULT_DATA_DIR, cache_dir="out/hf_datasets", hub=None,
              limit=0, add_bos=True, max_batch_tokens=8192, gsm8k_opts=None, progress=True, log=print):
    """-> ({task: metrics}, {task: per-item records})."""
    was_training = model.training
    model.eval()
    metrics, items = {}, {}
    for task in names:
        docs = load_docs(task, data_dir, cache_dir, hub, limit, log)
        if task == "gsm8k":
            train = load_docs("gsm8k_train", data_dir, cache_dir, hub, 0, log) if fmt != "chat" else []
            metrics[task], items[task] = run_gsm8k(model, tok, docs, train, fmt, add_bos, progress=progress, log=log,
                                                   **(gsm8k_opts or {}))
        else:
            metrics[task], items[task] = run_mc_task(model, tok, task, docs, add_bos, max_batch_tokens, progress, log)
    model.train(was_training)
    return metrics, items


def headline(task, m):
    return m[HEADLINE[task]]


def format_table(rows, names, sets):
    """rows: [{"name": checkpoint label, "metrics": {task: metrics}}] -> Markdown: one row per
    checkpoint; a column per task (its headline metric), one per named set (its mean), and the mean."""
    cols = list(names) + list(sets)
    head = "| checkpoint | " + " | ".join(f"{c} ({HEADLINE[c].split(',')[-1]})" if c in HEADLINE else f"{c} (mean)"
                                         for c in cols) + " | mean |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        vals = {t: headline(t, r["metrics"][t]) for t in names}
        for s, members in sets.items():
            vals[s] = sum(vals[t] for t in members) / len(members)
        mean = sum(vals[t] for t in names) / len(names)
        lines.append(f"| {r['name']} | " + " | ".join(f"{vals[c]:.4f}" for c in cols) + f" | {mean:.4f} |")
    return "\n".join(lines)
