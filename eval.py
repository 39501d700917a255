"""
Evaluate checkpoints and print one table across stages.

    python eval.py --ckpts=out/pretrain,out/sft,out/grpo --data_dir=out/data

For each checkpoint: held-out accuracy (pass@1 greedy, exact match on the number after '####'),
pass@k from k samples at `temperature`, the share of greedy completions cut off by max_new_tokens,
and validation loss (nats/token) and bits per byte on held-out text (skipped when there is none).
Held-out rows may be GSM8K rows, {question, target} rows or chat `messages` rows (tasks.load_examples):

    python eval.py --ckpts=out/sft --heldout=../shared/data/gsm8k/test.jsonl --max_new_tokens=256 \
        --val_text=../shared/data/tinystories/tinystories_sample.txt

A pretrained checkpoint is prompted in the plain text format it was trained on, SFT/GRPO
checkpoints in the chat format. Writes <out>.json and <out>.md.

With --tasks, the public benchmarks instead (benchmarks.py: lm-evaluation-harness's formats and metrics):

    python eval.py --ckpts=a,b,c --tasks=l20,gsm8k --limit=500

prints one Markdown table (rows: checkpoints; columns: each task's headline metric, the l20 mean, the
mean) and writes <out>_benchmarks.json (every item's prediction and per-choice log-likelihoods) and
<out>_benchmarks.md. Task names as the harness spells them: hellaswag arc_easy arc_challenge piqa
winogrande openbookqa lambada_openai mmlu gsm8k; `l20` = the first six.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from benchmarks import DEFAULT_DATA_DIR
from common import (atomic_write, autocast, init_distributed, load_checkpoint, log, parse_config, pick_kernels,
                    progress, ranks_gather_object, set_threads)
from engine import Engine, stop_tokens_for
from tasks import example_prompt_ids, load_examples, read_jsonl, stop_at_end
from verifiers import CORRECT, score_examples


@dataclass
class EvalConfig:
    ckpts: str = "out/pretrain,out/sft,out/grpo"  # comma-separated checkpoint (or stage) directories
    data_dir: str = "out/data"
    heldout: str = ""           # held-out problems (JSONL, any format of tasks.ROW_FORMATS); "" = <data_dir>/heldout.jsonl
    val_text: str = ""          # text for val loss / bits per byte: .jsonl rows with "text", or any text file;
                                # "" = <data_dir>/val_text.jsonl if it exists, "none" = skip
    n_heldout: int = 400
    k: int = 8                  # pass@k samples per problem
    temperature: float = 1.0    # for the pass@k samples
    max_new_tokens: int = 64    # completion budget; GSM8K solutions need ~256 (see the truncation warning)
    batch_size: int = 256       # sequences generated at once
    max_val_windows: int = 256  # text loss: at most this many max_seq_len windows
    out: str = "out/eval"       # writes out/eval.json and out/eval.md
    seed: int = 0
    device: str = "auto"
    kernels: str = "auto"
    # public benchmarks (benchmarks.py); empty = the embedded task above
    tasks: str = ""             # e.g. l20,mmlu,gsm8k
    limit: int = 0              # first N items of each task, of each MMLU subject (0 = all), as the harness's --limit
    benchmark_dir: str = DEFAULT_DATA_DIR  # local eval sets (../shared/data layout); else the Hub
    hf_cache: str = "out/hf_datasets"      # where Hub downloads are cached
    add_bos: str = "auto"       # BOS before each context: auto = yes for nanoforge-trained models (trained with
                                # <|bos|> first), no for imported ones (the harness's default for HF causal LMs)
    max_batch_tokens: int = 8192  # packed tokens per scoring forward
    gsm8k_format: str = "auto"  # auto (the checkpoint's: plain -> 5-shot base, chat -> 0-shot chat), base, chat
    gsm8k_max_new_tokens: int = 256  # the harness's max_gen_toks
    gsm8k_batch_size: int = 32  # problems generated at once
    gsm8k_samples: int = 0      # n samples per problem for mean@n and pass@k (0 = greedy only)
    gsm8k_k: str = "1,8"        # pass@k for these k (<= gsm8k_samples)
    sandbox: str = "auto"       # code isolation for code/code_output rows: auto, bwrap, unshare, none (= accept weaker)


TRUNCATION_WARN = 0.10  # warn when more than this fraction of completions hit max_new_tokens


def fit_prompts(tok, examples, fmt, max_seq_len, max_new_tokens, what):
    """Examples whose prompt leaves room for max_new_tokens in the context; the others are counted
    and reported once, up front (a prompt that cannot fit would otherwise end generation)."""
    if max_new_tokens >= max_seq_len:
        raise SystemExit(f"error: --max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {max_seq_len} tokens; lower it.")
    budget = max_seq_len - max_new_tokens
    kept = [ex for ex in examples if len(example_prompt_ids(tok, ex, fmt)) <= budget]
    if len(kept) < len(examples):
        log(f"note: skipped {len(examples) - len(kept)} of {len(examples)} {what} whose {fmt} prompt is longer than "
            f"{budget} tokens (context {max_seq_len} - max_new_tokens {max_new_tokens})")
    return kept


def truncated(ids, max_new_tokens, stop_id):
    """A completion was cut off by max_new_tokens: it used the whole budget and did not stop."""
    return len(ids) >= max_new_tokens and (not ids or ids[-1] != stop_id)


def warn_truncation(frac, what, max_new_tokens):
    if frac > TRUNCATION_WARN:
        log(f"warning: {100 * frac:.0f}% of {what} completions hit --max_new_tokens={max_new_tokens} before ending; "
            f"their answers are cut off (scored wrong). Raise --max_new_tokens.")


def check_budget(tok, examples, max_new_tokens, what):
    """Up front: warn when the reference answers of the data are mostly longer than max_new_tokens
    (then nearly every completion is cut off and every reward is 0)."""
    refs = [ex["answer"] for ex in examples[:1000] if ex.get("answer")]
    if not refs:
        return
    lens = sorted(len(ids) + 1 for ids in tok.encode_batch(refs))  # + the closing <|end|>
    longer = sum(n > max_new_tokens for n in lens) / len(lens)
    if longer > TRUNCATION_WARN:
        log(f"warning: {100 * longer:.0f}% of the {what} reference answers are longer than --max_new_tokens="
            f"{max_new_tokens} tokens (median {lens[len(lens) // 2]}, 90th percentile {lens[int(0.9 * (len(lens) - 1))]})"
            f"; completions that long are cut off and score 0. Raise --max_new_tokens.")


def completions(model, tok, examples, fmt, n_samples, temperature, max_new_tokens, batch_size, seed,
                desc=None, rank=0, world=1):
    """n_samples completions (text) for each example, grouped: out[i] is the list for examples[i];
    and the fraction of all completions cut off by max_new_tokens (the engine's truncated flag).
    The examples go to the engine in chunks; chunk c samples from a generator seeded with seed + CHUNK_SEED * c
    (chunk 0: `seed` itself), so a chunk's completions do not depend on which process generated it. Under
    torchrun (world > 1) rank r generates chunks r, r + world, ... and every rank gets all of them back
    (all_gather_object): the same texts as one process."""
    engine = Engine(model, max_batch=batch_size)
    gen = torch.Generator(device=model.embed.weight.device)
    per_chunk = max(1, batch_size // n_samples)  # examples per engine call, for the progress lines
    mine = []  # (chunk start, texts, cut-off count) of this rank's chunks
    starts = range(0, len(examples), per_chunk)
    for c in progress(range(rank, len(starts), world), desc=desc, leave=False, disable=desc is None or rank != 0):
        i = starts[c]
        gen.manual_seed(seed + CHUNK_SEED * c)
        prompts = [example_prompt_ids(tok, ex, fmt) for ex in examples[i:i + per_chunk]]
        out = engine.generate(prompts, n=n_samples, max_new_tokens=max_new_tokens,
                              stop_tokens=stop_tokens_for(tok, fmt), temperature=temperature, generator=gen)
        mine.append((i, [[stop_at_end(tok.decode(s.tokens), fmt) for s in group] for group in out],
                     sum(s.truncated for group in out for s in group)))
    if world > 1:
        mine = sorted(p for part in ranks_gather_object(mine) for p in part)
    texts = [t for _, chunk, _ in mine for t in chunk]
    n_cut = sum(n for _, _, n in mine)
    return texts, n_cut / max(1, len(examples) * n_samples)


CHUNK_SEED = 1_000_003  # seed offset between consecutive generation chunks (see completions)


@torch.no_grad()
def heldout_accuracy(model, tok, problems, fmt, k=8, temperature=1.0, max_new_tokens=64, batch_size=256,
                     seed=0, desc=None, sandbox="auto", rank=0, world=1):
    """-> {"pass@1": %, "pass@k": %, "truncated": % of greedy completions cut off by max_new_tokens} on
    problems (examples of tasks.load_examples, scored by verifiers.score_examples as GRPO rewards them,
    strict answer match), plus "pass@1/<kind>" for each task kind when there are several. pass@1 is greedy;
    a completion is correct when its score is >= 0.99. Under torchrun every rank calls it with its rank and
    the world size: the ranks generate disjoint chunks of the problems, and all return the same numbers."""
    was_training = model.training
    model.eval()
    greedy, cut = completions(model, tok, problems, fmt, 1, 0.0, max_new_tokens, batch_size, seed, desc, rank, world)
    warn_truncation(cut, "held-out greedy", max_new_tokens)
    ok = [s >= CORRECT for s in score_examples(problems, [g[0] for g in greedy], isolation_mode=sandbox)]
    res = {"pass@1": 100 * sum(ok) / len(problems)}
    kinds = sorted({p["kind"] for p in problems})
    if len(kinds) > 1:
        for kind in kinds:
            idx = [i for i, p in enumerate(problems) if p["kind"] == kind]
            res[f"pass@1/{kind}"] = 100 * sum(ok[i] for i in idx) / len(idx)
    if k > 0:
        samples, _ = completions(model, tok, problems, fmt, k, temperature, max_new_tokens, batch_size, seed + 1,
                                 desc, rank, world)
        flat = score_examples([p for p in problems for _ in range(k)], [s for ss in samples for s in ss],
                              isolation_mode=sandbox)
        pk = sum(any(s >= CORRECT for s in flat[i * k:(i + 1) * k]) for i in range(len(problems)))
        res[f"pass@{k}"] = 100 * pk / len(problems)
    res["truncated"] = 100 * cut
    model.train(was_training)
    return res


def read_texts(path):
    """Documents for the text loss: a .jsonl file's "text" fields, or a plain text file split on
    <|endoftext|> (TinyStories style) when it has any, else taken whole."""
    if path.endswith(".jsonl"):
        rows = read_jsonl(path, with_lines=True)
        bad = [i for i, r in rows if not isinstance(r, dict) or not isinstance(r.get("text"), str)]
        if bad:
            raise SystemExit(f'error: {len(bad)} rows of {path} have no "text" field (first: {path}:{bad[0]}); '
                             f'--val_text takes JSONL rows {{"text": ...}} or a plain text file')
        return [r["text"] for _, r in rows]
    if not os.path.exists(path):
        raise SystemExit(f"error: --val_text file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 (byte offset {e.start}); re-encode it as UTF-8")
    docs = [d for d in text.split("<|endoftext|>") if d.strip()]
    return docs


@torch.no_grad()
def text_loss(model, tok, texts, device, batch_size=32, max_windows=0, rank=0, world=1):
    """Mean NLL per token (nats) and bits per byte over documents, each starting with <|bos|>.
    A document longer than the context is cut into consecutive max_seq_len windows (each token is
    predicted once); at most max_windows windows (0 = all) are scored. Under torchrun rank r scores
    batches r, r + world, ... and the sums are all-reduced."""
    model.eval()
    max_len = model.cfg.max_seq_len
    windows = []
    for t in texts:
        ids = [tok.bos_id] + tok.encode(t)
        windows += [ids[j:j + max_len + 1] for j in range(0, len(ids) - 1, max_len)]
        if max_windows and len(windows) >= max_windows:
            windows = windows[:max_windows]
            break
    nll, n_tok, n_bytes = 0.0, 0, 0
    for i in range(rank * batch_size, len(windows), world * batch_size):
        rows = windows[i:i + batch_size]
        L = max(len(r) for r in rows)
        x = torch.zeros(len(rows), L - 1, dtype=torch.long)
        y = torch.full((len(rows), L - 1), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :len(r) - 1] = torch.tensor(r[:-1])
            y[b, :len(r) - 1] = torch.tensor(r[1:])
        x, y = x.to(device), y.to(device)
        with autocast(device):
            lp = model.token_logprobs(x, y.clamp(min=0))
        m = (y != -100)
        nll -= lp[m].double().sum().item()
        n_tok += int(m.sum())
        n_bytes += sum(len(tok.decode(r[1:]).encode()) for r in rows)
    if world > 1:
        sums = torch.tensor([nll, n_tok, n_bytes], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        nll, n_tok, n_bytes = sums.tolist()
    return nll / n_tok, nll / (math.log(2) * n_bytes)


def row_label(row):
    """A checkpoint's name in the table: its stage, directory and step, so two SFT runs differ."""
    return f"{row['stage']} ({row['ckpt']}, step {row['step']})"


def format_table(rows, k):
    per_kind = sorted({key for r in rows for key in r if key.startswith("pass@1/")})
    cols = ["pass@1"] + ([f"pass@{k}"] if k > 0 else []) + per_kind + ["truncated"]
    head = "| checkpoint | " + "".join(f"{'cut off' if c == 'truncated' else c} (%) | " for c in cols) \
        + "val loss | bits/byte |"
    lines = [head, "|---|" + "---:|" * len(cols) + "---:|---:|"]
    num = lambda v, f: "n/a" if v is None or v != v else format(v, f)  # noqa: E731  (None/NaN: not measured)
    for r in rows:
        lines.append(f"| {row_label(r)} | " + "".join(f"{num(r.get(c), '.1f')} | " for c in cols)
                     + f"{num(r.get('val_loss'), '.4f')} | {num(r.get('bpb'), '.4f')} |")
    return "\n".join(lines)


def benchmark_main(cfg, device, kernels):
    import benchmarks
    names, sets = benchmarks.parse_tasks(cfg.tasks)
    if cfg.gsm8k_format not in ("auto", "base", "chat"):
        raise SystemExit(f"error: --gsm8k_format must be auto, base or chat, got '{cfg.gsm8k_format}'")
    if cfg.add_bos not in ("auto", "true", "false"):
        raise SystemExit(f"error: --add_bos must be auto, true or false, got '{cfg.add_bos}'")
    log(f"eval: benchmarks {' '.join(names)}" + (f", first {cfg.limit} items each" if cfg.limit else "")
        + f", device {device}, kernels {kernels}")
    gsm8k_opts = dict(max_new_tokens=cfg.gsm8k_max_new_tokens, batch_size=cfg.gsm8k_batch_size,
                      n_samples=cfg.gsm8k_samples, temperature=cfg.temperature, seed=cfg.seed,
                      k_list=[int(k) for k in cfg.gsm8k_k.split(",") if k])
    rows, items = [], {}
    for path in [p for p in cfg.ckpts.split(",") if p]:
        model, tok, meta, ckpt = load_checkpoint(path, device, kernels=kernels)
        fmt = {"auto": meta.get("fmt", "chat"), "base": "plain", "chat": "chat"}[cfg.gsm8k_format]
        add_bos = meta.get("stage") != "import" if cfg.add_bos == "auto" else cfg.add_bos == "true"
        t0 = time.time()
        metrics, its = benchmarks.run_tasks(model, tok, names, fmt=fmt, data_dir=cfg.benchmark_dir,
                                            cache_dir=cfg.hf_cache, limit=cfg.limit, add_bos=add_bos,
                                            max_batch_tokens=cfg.max_batch_tokens, gsm8k_opts=gsm8k_opts, log=log)
        rows.append({"name": path, "ckpt": ckpt, "stage": meta.get("stage"), "step": meta.get("step"),
                     "gsm8k_format": fmt, "add_bos": add_bos,
                     "metrics": metrics, "seconds": round(time.time() - t0, 1)})
        items[path] = its
    table = benchmarks.format_table(rows, names, sets)
    print("\n" + table + "\n")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    atomic_write(cfg.out + "_benchmarks.json", json.dumps({"config": cfg.__dict__, "tasks": names, "sets": sets,
                                                            "rows": rows, "items": items}))
    atomic_write(cfg.out + "_benchmarks.md", table + "\n")
    log(f"wrote {cfg.out}_benchmarks.json (per-item predictions and scores) and {cfg.out}_benchmarks.md")
    return rows


def resolve_val_text(cfg):
    if cfg.val_text == "none":
        return None
    if cfg.val_text:
        return cfg.val_text
    auto = os.path.join(cfg.data_dir, "val_text.jsonl")
    return auto if os.path.exists(auto) else None


def main(cfg):
    set_threads()
    # under torchrun: each rank generates and scores its share of the held-out items; rank 0 prints and writes
    rank, world, device = init_distributed(cfg.device)
    kernels = pick_kernels(cfg.kernels, device)
    if cfg.tasks:
        if world > 1:  # the public benchmarks are not split: rank 0 runs them alone
            torch.distributed.destroy_process_group()
            if rank != 0:
                return None
            log(f"note: --tasks runs on rank 0 only ({world} ranks started); launch it without torchrun")
        return benchmark_main(cfg, device, kernels)
    say = log if rank == 0 else (lambda msg: None)
    heldout = cfg.heldout or os.path.join(cfg.data_dir, "heldout.jsonl")
    all_problems = load_examples(heldout, "target", "held-out", limit=cfg.n_heldout)
    val_path = resolve_val_text(cfg)
    val_texts = read_texts(val_path) if val_path else None
    if val_texts is None:
        say("note: no --val_text given (and no <data_dir>/val_text.jsonl): validation loss and bits per byte "
            "are skipped. Pass --val_text=FILE (a text file or JSONL with a \"text\" field) to measure them.")
    say(f"eval: {len(all_problems)} held-out problems from {heldout}, pass@{cfg.k}, "
        f"max_new_tokens {cfg.max_new_tokens}, device {device}, kernels {kernels}"
        + (f", {world} ranks" if world > 1 else ""))
    rows = []
    for path in [p for p in cfg.ckpts.split(",") if p]:
        t0 = time.time()
        model, tok, meta, ckpt = load_checkpoint(path, device, kernels=kernels)
        fmt = meta.get("fmt", "chat")
        problems = fit_prompts(tok, all_problems, fmt, model.cfg.max_seq_len, cfg.max_new_tokens,
                               f"held-out problems for {ckpt}")
        check_budget(tok, problems, cfg.max_new_tokens, "held-out")
        acc = heldout_accuracy(model, tok, problems, fmt, cfg.k, cfg.temperature, cfg.max_new_tokens,
                               cfg.batch_size, cfg.seed, desc=f"eval {meta['stage']}", sandbox=cfg.sandbox,
                               rank=rank, world=world) if problems else {}
        vloss, bpb = text_loss(model, tok, val_texts, device, max_windows=cfg.max_val_windows, rank=rank,
                               world=world) if val_texts else (None, None)
        row = {"stage": meta["stage"], "ckpt": ckpt, "step": meta["step"], "format": fmt, **acc,
               "val_loss": vloss, "bpb": bpb, "n_heldout": len(problems), "seconds": round(time.time() - t0, 1)}
        say(json.dumps(row))
        rows.append(row)
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return rows
    table = format_table(rows, cfg.k)
    print("\n" + table + "\n")
    atomic_write(cfg.out + ".json", {"config": dataclasses.asdict(cfg), "rows": rows})
    atomic_write(cfg.out + ".md", table + "\n")
    return rows


if __name__ == "__main__":
    main(parse_config(EvalConfig()))
