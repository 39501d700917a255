"""
What every stage shares: command-line config, device choice, checkpoints, metrics lines.

A checkpoint is a directory `<out_dir>/ckpt/`:
    model.pt        weights (state_dict)            -- torch.load(weights_only=True): no code runs on load
    optim.pt        optimizer state                 -- likewise
    rng.pt          torch RNG states
    meta.json       stage, step, model config, training config, tokenizer fingerprint, data position,
                    numpy/python RNG states
    tokenizer.json  the tokenizer
`ckpt/` is the newest; the `keep_last - 1` before it stay beside it as `ckpt-<step>/` (same files), so a
bad-but-finite update can be rolled back by hand. A checkpoint is written whole into `ckpt.tmp/` and then
swapped in with renames, so a crash mid-write leaves the previous one whole; non-finite weights are never
saved. Older layouts (`ckpt.old/`) still load.

A training stage also gets, from `start_run`: a lock (`run.lock`) against a second run in its out_dir, a
refusal to replace a previous run without --overwrite=true, the saved config restored on --resume=true
(changes printed, the ones that cannot apply refused), and SIGTERM/SIGINT handling (checkpoint at the end
of the step, then exit). See the README's "Reliability" section.
"""
import atexit
import contextlib
import dataclasses
import errno
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import tokenize
import weakref

import numpy as np
import torch

from model import GPT, ModelConfig
from tokenizer import tokenizer_from_json


def parse_config(cfg, argv=None):
    """Override dataclass fields from `--key=value` arguments, then validate (validate_config).

    `--help` prints every field with its default and the comment written beside it. Unknown keys, values
    of the wrong type and invalid values end with one line. The keys given are remembered (given_keys),
    so a resumed run knows which settings the user asked to change."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    given = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help(cfg))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: expected --key=value, got '{arg}'. Keys: {', '.join(fields)} (--help for all)")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown config key '{key}'. Valid keys: {', '.join(fields)} (--help for all)")
        old = getattr(cfg, key)
        if not eq and not isinstance(old, bool):
            raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE")
        try:
            if isinstance(old, bool):
                val = val or "true"  # a bare --flag means true
                if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(val)
                new = val.lower() in ("true", "1", "yes")
            elif old is None:
                new = val
            else:
                new = type(old)(val)
        except ValueError:
            raise SystemExit(f"error: --{key} expects a {type(old).__name__}, got '{val}'")
        setattr(cfg, key, new)
        given.add(key)
    _GIVEN[id(cfg)] = (weakref.ref(cfg), given)
    validate_config(cfg)
    return cfg


_GIVEN = {}  # id(cfg) -> (weak reference, keys given): kept off the instance, so copies and asdict stay plain


def given_keys(cfg):
    """The fields the user set: those parse_config saw on the command line, or (a config built in Python)
    those that differ from the dataclass defaults."""
    ref, given = _GIVEN.get(id(cfg), (None, None))
    if ref is not None and ref() is cfg:
        return set(given)
    default = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


# --help text for the fields the stages share, used where a config's source has no comment beside the field
COMMON_HELP = {
    "out_dir": "where this stage writes (checkpoints, metrics.jsonl)", "init_from": "checkpoint (or stage dir) to start from",
    "data": "training rows (JSONL)", "data_dir": "token shards + tokenizer.json (data.py / tasks.py output)",
    "heldout": "held-out problems (JSONL) for the accuracy report", "batch_size": "sequences per optimizer step",
    "seq_len": "tokens per training sequence", "grad_accum": "micro-batches accumulated per optimizer step",
    "max_steps": "optimizer steps in all (a resumed run may raise it)", "epochs": "passes over the training rows",
    "iterations": "GRPO iterations (sample, score, update) in all", "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay", "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (not on norms)", "beta2": "AdamW beta2", "grad_clip": "max gradient norm",
    "eval_interval": "steps between evaluations", "eval_batches": "validation batches per evaluation",
    "ckpt_interval": "steps between checkpoints", "log_interval": "steps between metrics lines",
    "seed": "random seed", "device": "auto, cpu, cuda, cuda:N or mps", "kernels": "auto (Triton on CUDA), torch or triton",
    "compile": "torch.compile the model", "prompts_per_iter": "problems drawn per iteration",
    "group_size": "completions sampled per problem (the group of the advantages)",
    "temperature": "sampling temperature", "top_p": "nucleus sampling mass (1 = off)",
    "max_new_tokens": "longest completion sampled", "ppo_epochs": "optimizer steps per sampled batch",
    "clip_eps": "PPO ratio clip range", "adv_eps": "added to the group std when normalizing advantages",
    "n_eval": "held-out problems evaluated (0 = none)", "n_heldout": "held-out problems evaluated",
    "vocab_size": "tokenizer vocabulary size, special tokens included",
    "gradient_checkpointing": "recompute each block's activations in the backward (less memory, more compute)",
    "micro_batch": "sequences per forward/backward",
}


def field_comments(cls):
    """{field: help} from `metadata={"help": ...}` or else the comment written beside the field in the source
    (continued on following comment-only lines at the same column). config_help falls back to COMMON_HELP."""
    out = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (frozen app, REPL): defaults only
        return out
    comments = {}  # line index -> (column, text)
    try:
        for t in tokenize.generate_tokens(iter(lines).__next__):
            if t.type == tokenize.COMMENT:
                comments[t.start[0] - 1] = (t.start[1], t.string.lstrip("#").strip())
    except (tokenize.TokenError, IndentationError):
        return out
    names = {f.name for f in dataclasses.fields(cls)}
    for i, line in enumerate(lines):
        m = re.match(r"\s+(\w+)\s*:", line)
        if not m or m.group(1) not in names or m.group(1) in out or i not in comments:
            continue
        col, text = comments[i]
        j = i + 1
        while j in comments and lines[j].strip().startswith("#") and comments[j][0] == col:
            text += " " + comments[j][1]
            j += 1
        out[m.group(1)] = text
    return out


def config_help(cfg):
    cls = type(cfg)
    module = sys.modules.get(cls.__module__)
    doc = (module.__doc__ or "").strip() if module is not None else ""
    script = os.path.basename(getattr(module, "__file__", None) or sys.argv[0])
    lines = [doc, ""] if doc else []
    lines.append(f"usage: python {script} [--key=value ...]   (options of {cls.__name__}, defaults shown)")
    comments = field_comments(cls)
    show = lambda v: str(v).lower() if isinstance(v, bool) else v  # noqa: E731  (copy-pastable true/false)
    rows = [(f"--{f.name}={show(getattr(cfg, f.name))}", f.type if isinstance(f.type, str) else f.type.__name__,
             comments.get(f.name, COMMON_HELP.get(f.name, ""))) for f in dataclasses.fields(cfg)]
    width = max(len(r[0]) for r in rows)
    for opt, typ, text in rows:
        lines.append(f"  {opt:<{width}}  {typ:<5}  {text}".rstrip())
    return "\n".join(lines)


# Generic value rules, applied to whichever of these fields a config has (every stage's config, and data.py's).
POSITIVE_FIELDS = {"batch_size", "seq_len", "grad_accum", "max_steps", "eval_batches", "iterations",
                   "prompts_per_iter", "group_size", "max_new_tokens", "micro_batch", "num_iterations", "keep_last",
                   "epochs", "n_heldout", "vocab_size", "batch_docs", "shard_tokens"}
NON_NEGATIVE_FIELDS = {"warmup_steps", "n_eval", "k", "lr", "min_lr", "weight_decay", "grad_clip", "beta",
                       "temperature", "adv_eps", "epsilon", "epsilon_high", "mgpo_lambda", "peak_tflops", "workers"}
DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)$")


def validate_config(cfg):
    """One line for the first invalid value: sizes, counts and intervals > 0 (any field named *_interval or
    *_size too), rates >= 0, floats finite, a known device and kernel choice."""
    for f in dataclasses.fields(cfg):
        name, val = f.name, getattr(cfg, f.name)
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        if isinstance(val, float) and not math.isfinite(val):
            raise SystemExit(f"error: --{name}={val} is not a finite number")
        if (name in POSITIVE_FIELDS or name.endswith("_interval") or name.endswith("_size")) and val <= 0:
            raise SystemExit(f"error: --{name}={val} must be > 0")
        if name in NON_NEGATIVE_FIELDS and val < 0:
            raise SystemExit(f"error: --{name}={val} must be >= 0")
    if hasattr(cfg, "top_p") and not 0 < cfg.top_p <= 1:
        raise SystemExit(f"error: --top_p={cfg.top_p} must be in (0, 1]")
    device = getattr(cfg, "device", "auto")
    if isinstance(device, str) and not DEVICE_RE.match(device):
        raise SystemExit(f"error: --device={device} is not a known device; use auto, cpu, cuda, cuda:N or mps")
    kernels = getattr(cfg, "kernels", "auto")
    if isinstance(kernels, str) and kernels not in ("auto", "torch", "triton"):
        raise SystemExit(f"error: --kernels must be auto, torch or triton, got '{kernels}'")
    return cfg


# ----------------------------------------------------------------------------------------------
# Atomic writes: THE helper for every file that is (re)written in place.

@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write `path` all or nothing: into a temporary file in the same directory, fsync, os.replace over
    `path`, fsync the directory. A crash (or a full disk) at any point leaves the old `path` untouched.
    A full disk ends with one line saying so."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SystemExit(f"error: disk full (ENOSPC) while writing {path}; it was left as it was. "
                             f"Free some space and run again.") from e
        raise


def atomic_write(path, data):
    """Text (str), bytes, or any JSON-able object (written as indented JSON), atomically (atomic_open)."""
    if isinstance(data, (bytes, bytearray)):
        mode = "wb"
    elif isinstance(data, str):
        mode = "w"
    else:
        data, mode = json.dumps(data, indent=1, default=str) + "\n", "w"
    with atomic_open(path, mode) as f:
        f.write(data)


def fsync_dir(d):
    """Make renames inside directory d durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def init_distributed(device_name="auto"):
    """Data parallelism under torchrun (nanoGPT style): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; join
    the process group (nccl on CUDA, gloo elsewhere) and take this rank's device.
    -> (rank, world_size, device). Without torchrun: (0, 1, pick_device(device_name)), exactly as before."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def ranks():
    """(rank, world size) of the process group, (0, 1) without torchrun."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ranks_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (any picklable object, all_gather_object); [obj] without torchrun."""
    world = ranks()[1]
    if world == 1:
        return [obj]
    parts = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def ranks_reduce(value, op="sum"):
    """A number summed (or the max / min) over the ranks; the value itself without torchrun."""
    dist = torch.distributed
    if ranks()[1] == 1:
        return value
    dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(value), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return type(value)(t.item())


def shard_model(model):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): each block, then the root (embedding, final norm), so that
    parameters, gradients and optimizer state are split across the ranks; a block's weights are gathered for
    its forward and backward only. Build the optimizer after this (its parameters are the shards)."""
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def grad_sync(model, sync):
    """A context for one micro-step's forward+backward: gradients reduced across ranks only when `sync` (the
    last micro-step). DDP: no_sync(); FSDP2: set_requires_gradient_sync; a single process: nothing."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _optim_order(model, optimizer):
    """Parameter names in the order a single process's optimizer.state_dict() numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_full(model, optimizer, device):
    """A sharded (FSDP2) model's full weights and optimizer state, gathered to rank 0 on the CPU
    (torch.distributed.checkpoint.state_dict, full_state_dict + cpu_offload); every rank must call it.
    -> on rank 0 (a plain GPT on `device`, an object whose state_dict() is the optimizer state exactly as a
    single process's AdamW writes it: parameter indices, not names), so save_checkpoint writes a checkpoint
    that loads in one process; (None, None) on the other ranks."""
    import types
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    if torch.distributed.get_rank() != 0:
        return None, None
    plain = GPT.from_state_dict(model.cfg, msd).to(device)
    if osd is None:
        return plain, None
    index = {n: i for i, n in enumerate(_optim_order(model, optimizer))}
    full = {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}
    return plain, types.SimpleNamespace(state_dict=lambda: full)


def load_sharded_optimizer(model, optimizer, path):
    """--resume of a sharded (FSDP2) run: the full optimizer state of `path` (as gather_full saved it, the
    single-process layout) split into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    sd = torch.load(path, weights_only=True)
    order = _optim_order(model, optimizer)
    named = {"state": {order[i]: v for i, v in sd["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def pick_kernels(name, device):
    """'auto' = the Triton kernels on CUDA, PyTorch elsewhere."""
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name not in ("torch", "triton"):
        raise SystemExit(f"error: --kernels must be auto, torch or triton, got '{name}'")
    return name


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slow, MPS bf16 is patchy)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log(msg):
    print(msg, flush=True)


def available_cpus():
    """CPUs this process may actually use: its affinity mask, capped by a cgroup v2 CPU quota
    (a container's --cpus). os.cpu_count() reports the whole machine, which oversubscribes."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads():
    """One PyTorch thread per available CPU (see available_cpus), shared among torchrun's local
    processes; OMP_NUM_THREADS, when set, wins.
    More threads than cores (or cores busy with other work) slows CPU training many times over."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: the processes share the CPUs
    n = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() \
        else available_cpus() // max(1, local_ranks)
    n = max(1, n)
    torch.set_num_threads(n)
    return n


class PlainProgress:
    """What progress() returns when output is not a terminal: the same calls as tqdm, printed as a
    plain line at every tenth of the way (and at least once a minute) instead of a redrawn bar."""

    def __init__(self, iterable=None, desc=None, total=None, initial=0, **_):
        self.iterable, self.desc = iterable, desc or "progress"
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.t0 = initial, "", time.time()
        self.last_print, self.next_mark = self.t0, self._mark_after(initial)

    def _mark_after(self, n):
        if not self.total:
            return float("inf")
        step = max(1, self.total // 10)
        return (n // step + 1) * step

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)

    def update(self, k=1):
        self.n += k
        now = time.time()
        if self.n >= self.next_mark or self.n == self.total or now - self.last_print >= 60:
            self.next_mark = self._mark_after(self.n)
            self.last_print = now
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{of} ({now - self.t0:.0f}s){self.postfix}", flush=True)

    def set_postfix(self, **kw):
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, msg):
        print(msg, flush=True)

    def close(self):
        pass


def progress(iterable=None, desc=None, disable=False, **kw):
    """A tqdm bar on a terminal; periodic plain lines (PlainProgress) when output goes to a file or
    a pipe, where a redrawn bar would flood the log. disable=True shows nothing."""
    from tqdm import tqdm
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, **kw)
    return PlainProgress(iterable, desc=desc, **kw)


class Metrics:
    """Appends one JSON object per line to <out_dir>/metrics.jsonl and prints a short line.

    A fresh run starts an empty file (start_run has already refused to replace another run's metrics
    unless --overwrite=true); a resumed run keeps the lines up to the checkpoint's step and drops those
    a killed run wrote past it, rewriting the file atomically (a kill during the rewrite loses nothing)."""

    def __init__(self, out_dir, resume_step=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f, atomic_open(self.path) as out:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            out.write(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:  # the half-written last line of a killed run
                        pass
        elif os.path.exists(self.path):
            os.remove(self.path)

    def write(self, **row):
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# Checkpoints

CKPT_RE = re.compile(r"ckpt(-\d+|\.old|\.tmp)?")


def check_finite(value, what, step, out_dir):
    """Stop before anything non-finite can reach a checkpoint: one line naming the step and the good checkpoint."""
    v = torch.as_tensor(value)
    if not torch.isfinite(v).all():
        raise SystemExit(f"error: {what} is {v.float().sum().item()} at step {step}. Lower --lr (or check the data); "
                         f"nothing was saved from this step on. The last good checkpoint: {last_good_checkpoint(out_dir)}.")


def nonfinite_tensors(state):
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


@torch.no_grad()
def diverged(model, state):
    """Why these weights are unusable, or None: non-finite tensors, or finite weights so large (a blown-up update,
    e.g. 2.5e36) that the logits of a one-token probe are not finite (or, the norms having overflowed, constant)."""
    bad = nonfinite_tensors(state)
    if bad:
        return f"non-finite weights ({len(bad)} tensors, e.g. {bad[0]})"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probe = torch.arange(min(8, model.cfg.vocab_size), device=device)[None]  # a few distinct tokens
    with autocast(device):
        logits = model(probe)
    model.train(was_training)
    if not torch.isfinite(logits).all() or logits.float().std() == 0:  # overflowed: NaN, or norms of inf -> all 0
        biggest = max(v.abs().max().item() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
        return f"weights up to {biggest:.2g} whose outputs are not finite (or all equal)"
    return None


def check_model(model, step, out_dir):
    """-> the state_dict, after stopping with one line if the weights diverged (see diverged)."""
    state = model.state_dict()
    why = diverged(model, state)
    if why:
        raise SystemExit(f"error: the model diverged by step {step} ({why}); not saved. The last good checkpoint: "
                         f"{last_good_checkpoint(out_dir)}. Lower --lr.")
    return state


def checkpoint_step(path):
    """The step of the checkpoint find_checkpoint would pick in `path`, or None."""
    try:
        return read_meta(find_checkpoint(path)).get("step")
    except SystemExit:
        return None


def last_good_checkpoint(out_dir):
    """For messages: 'out/pretrain/ckpt (step 400)', or a sentence saying there is none."""
    try:
        ckpt = find_checkpoint(out_dir)
        return f"{ckpt} (step {read_meta(ckpt).get('step')})"
    except SystemExit:
        return f"none in {out_dir} (the run had not saved one yet)"


def checkpoint_history(out_dir):
    """[(step, path)] of the older checkpoints `ckpt-<step>/` in out_dir, newest (highest step) last."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for n in os.listdir(out_dir):
        m = re.fullmatch(r"ckpt-(\d+)", n)
        if m and os.path.exists(os.path.join(out_dir, n, "meta.json")):
            found.append((int(m.group(1)), os.path.join(out_dir, n)))
    return sorted(found)


def save_checkpoint(out_dir, *, stage, step, model, tok, train_cfg, optimizer=None, extra=None, np_rng=None,
                    keep_last=None):
    """Write <out_dir>/ckpt/ (the newest) and keep the previous ones as <out_dir>/ckpt-<step>/, `keep_last` in all
    (default: train_cfg.keep_last, else 2). The new one is written whole into ckpt.tmp/ first; then the current
    ckpt/ is renamed to ckpt-<its step>/ and ckpt.tmp/ to ckpt/, so at every instant a whole checkpoint is on disk
    (between the two renames, find_checkpoint takes the newest ckpt-<step>/). Refuses non-finite weights: the
    good checkpoints stay as they are."""
    keep_last = keep_last or getattr(train_cfg, "keep_last", 2)
    state = check_model(model, step, out_dir)
    final = os.path.join(out_dir, "ckpt")
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(state, os.path.join(tmp, "model.pt"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optim.pt"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        cfg = dataclasses.asdict(model.cfg)
        cfg.pop("kernels")
        meta = {"stage": stage, "step": step, "model_config": cfg, "train_config": dataclasses.asdict(train_cfg),
                "tokenizer": tok.fingerprint, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "numpy_rng": np_rng.bit_generator.state if np_rng is not None else None,
                "python_rng": _jsonable(random.getstate()), **(extra or {})}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if _is_enospc(e):
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"error: disk full (ENOSPC) while saving the step-{step} checkpoint in {tmp}; it was "
                             f"removed. The last good checkpoint: {last_good_checkpoint(out_dir)}. Free some space "
                             f"and resume with --resume=true.") from e
        raise
    if os.path.exists(os.path.join(final, "meta.json")):
        prev_step = read_meta(final).get("step")
        prev = os.path.join(out_dir, f"ckpt-{prev_step}") if prev_step != step and keep_last > 1 else final + ".old"
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    elif os.path.exists(final):  # a leftover without meta.json is not a checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(out_dir)  # make the renames durable
    shutil.rmtree(final + ".old", ignore_errors=True)
    history = checkpoint_history(out_dir)  # prune: keep the keep_last - 1 highest steps beside ckpt/
    for _, path in history[:max(0, len(history) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def update_checkpoint_meta(ckpt, **fields):
    """Add fields to a written checkpoint's meta.json (atomically), e.g. a report computed after saving."""
    meta = read_meta(ckpt)
    meta.update(fields)
    atomic_write(os.path.join(ckpt, "meta.json"), meta)


def _is_enospc(e):
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def find_checkpoint(path, hint="Run the previous stage first, or pass its --out_dir as --init_from."):
    """Accept a stage directory (with ckpt/ inside) or a ckpt directory itself. Falls back to the newest
    ckpt-<step>/ (a crash between save_checkpoint's two renames) and the older layout's ckpt.old/."""
    for cand in (os.path.join(path, "ckpt"), path):
        if os.path.exists(os.path.join(cand, "meta.json")):
            return cand
    history = checkpoint_history(path)
    if history:
        return history[-1][1]
    old = os.path.join(path, "ckpt.old")
    if os.path.exists(os.path.join(old, "meta.json")):
        return old
    raise SystemExit(f"error: no checkpoint at {path} (expected {path}/ckpt/meta.json). {hint}")


META_SHAPE = {"stage": str, "step": int, "model_config": dict, "tokenizer": str}


def read_meta(ckpt):
    """A checkpoint's meta.json, checked for the fields every reader needs; one line if it is damaged."""
    path = os.path.join(ckpt, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is unreadable ({type(e).__name__}: {str(e)[:100]}). Use another checkpoint "
                         f"(e.g. an older ckpt-<step>/ beside it) or re-run the stage that wrote it.")
    if not isinstance(meta, dict):
        raise SystemExit(f"error: {path} is not a checkpoint's meta.json (a JSON {type(meta).__name__}, expected an "
                         f"object). Use another checkpoint or re-run the stage that wrote it.")
    for key, typ in META_SHAPE.items():
        if not isinstance(meta.get(key), typ) or (typ is int and isinstance(meta.get(key), bool)):
            raise SystemExit(f"error: {path} has no valid '{key}' (expected a {typ.__name__}, found "
                             f"{meta.get(key)!r}). Use another checkpoint or re-run the stage that wrote it.")
    return meta


def load_checkpoint(path, device="cpu", expect_stage=None, kernels="torch"):
    """-> (model, tokenizer, meta, ckpt_dir). Ends with one clear line on anything wrong, non-finite weights included."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    try:
        with open(os.path.join(ckpt, "tokenizer.json")) as f:
            tok = tokenizer_from_json(f.read())
        state = torch.load(os.path.join(ckpt, "model.pt"), map_location=device, weights_only=True)
    except FileNotFoundError as e:
        raise SystemExit(f"error: checkpoint {ckpt} is incomplete ({os.path.basename(e.filename)} missing). "
                         f"Re-run the stage that wrote it.")
    except Exception as e:  # truncated zip, bad JSON, ...
        raise SystemExit(f"error: checkpoint {ckpt} is corrupt ({type(e).__name__}: {str(e)[:120]}). "
                         f"Re-run the stage that wrote it, or point at another checkpoint.")
    if expect_stage is not None and meta.get("stage") not in expect_stage:
        raise SystemExit(f"error: {ckpt} is a '{meta.get('stage')}' checkpoint; this stage needs one of "
                         f"{list(expect_stage)}. Check --init_from.")
    if meta.get("tokenizer") != tok.fingerprint:
        raise SystemExit(f"error: checkpoint {ckpt} names tokenizer {meta.get('tokenizer')} but carries "
                         f"{tok.fingerprint}; the checkpoint is inconsistent, re-run the stage that wrote it.")
    try:
        cfg = ModelConfig(**meta["model_config"], kernels=kernels)
    except TypeError as e:
        raise SystemExit(f"error: {ckpt}/meta.json has a model_config this code cannot build ({e})")
    try:  # the loaded tensors become the parameters: no second copy, dtype kept (an import's bf16 stays bf16)
        model = GPT.from_state_dict(cfg, state)
    except RuntimeError as e:
        raise SystemExit(f"error: weights in {ckpt} do not fit its model config ({str(e)[:160]})")
    model = model.to(device)
    why = diverged(model, state)
    if why:
        older = [p for _, p in checkpoint_history(os.path.dirname(os.path.abspath(ckpt))) if p != ckpt]
        raise SystemExit(f"error: checkpoint {ckpt} holds {why}: it diverged and cannot be sampled from or trained. "
                         + (f"Use an older one: {', '.join(older)}." if older else "Re-run its stage with a lower --lr."))
    return model, tok, meta, ckpt


def load_training_state(ckpt, optimizer, np_rng=None):
    """Restore optimizer and RNG states for --resume. The optimizer's hyperparameters (lr, weight decay, betas) stay
    those it was built with from the config: a change --allow_config_change let through applies."""
    meta = read_meta(ckpt)
    built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else []
    for name in (["optim.pt"] if optimizer is not None else []) + ["rng.pt"]:
        path = os.path.join(ckpt, name)
        try:
            state = torch.load(path, weights_only=True)
            if name == "optim.pt":
                optimizer.load_state_dict(state)
            else:
                torch.set_rng_state(state["torch"])
                if "cuda" in state and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(state["cuda"])
        except FileNotFoundError:
            raise SystemExit(f"error: {path} is missing, so this run cannot resume exactly. Start a new run from its "
                             f"weights with --init_from={ckpt} (in another --out_dir), or resume from an older ckpt-<step>/.")
        except Exception as e:
            raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {str(e)[:100]}), so this run cannot resume "
                             f"exactly. Start a new run from its weights with --init_from={ckpt} (in another "
                             f"--out_dir), or resume from an older ckpt-<step>/.")
    for g, h in zip(optimizer.param_groups if optimizer else [], built):
        g.update({k: v for k, v in h.items() if k in ("lr", "weight_decay", "betas", "eps")})
    try:
        if np_rng is not None and meta.get("numpy_rng"):
            np_rng.bit_generator.state = meta["numpy_rng"]
        if meta.get("python_rng"):
            random.setstate(_tuplify(meta["python_rng"]))
    except (TypeError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {ckpt}/meta.json holds damaged RNG states ({type(e).__name__}: {str(e)[:80]}); "
                         f"resume from an older ckpt-<step>/ or start anew with --init_from={ckpt}.")
    return meta


# ----------------------------------------------------------------------------------------------
# A training run's guard: no accidental overwrite, one run per out_dir, pre-emption, resume checks.
# Each stage script calls `run = start_run(cfg, stage)` at the top of main, iterates `run.loop(steps, save)`
# and calls `run.close()` at the end; the mechanism is all here.

# On resume, a flag that differs from the saved run is printed; these fields may change freely (how long,
# how often to log/evaluate/save, on which hardware), a change to any other field is refused unless
# --allow_config_change=true (then it applies: optimizer settings are re-applied after the optimizer state
# loads), and a change to these can never apply: a resumed run's weights are its own checkpoint's.
FREE_ON_RESUME = {"max_steps", "iterations", "device", "kernels", "compile", "peak_tflops", "keep_last", "out_dir",
                  "resume", "overwrite", "allow_config_change", "heldout", "n_eval", "n_heldout", "k",
                  "eval_batches"}
NEVER_ON_RESUME = {"model", "init_from", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len",
                   "vocab_size"}
LOCK_NAME = "run.lock"


class StopRequested(SystemExit):
    """Raised (from Run.loop) after a signal's checkpoint was saved: exits with 128 + the signal number."""


class Run:
    """What start_run sets up for one training run in `out_dir`: the lock, the signal handlers, and
    `ckpt` (the checkpoint to resume from, or None)."""

    def __init__(self, cfg, stage, ckpt):
        self.cfg, self.stage, self.ckpt, self.out_dir = cfg, stage, ckpt, cfg.out_dir
        self.rank = int(os.environ.get("RANK", "0"))  # under torchrun rank 0 owns out_dir (lock, saves, messages)
        self.collective_save = False  # every rank calls save (FSDP: the weights are gathered); rank 0 writes
        self.signal = None          # the first SIGTERM/SIGINT received
        self.in_loop = False        # inside run.loop: defer the stop to the end of the current step
        self._old_handlers = {}
        self._lock = None

    # -- signals: the first one stops at the end of the current step (with a checkpoint), the second at once
    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None or not self.in_loop:
            log(f"\n{name}: exiting now, without saving. The last checkpoint: {last_good_checkpoint(self.out_dir)}")
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signal = signum
        log(f"\n{name}: saving a checkpoint at the end of this step, then exiting (send it again to exit at once)")

    def loop(self, steps, save):
        """Yields the steps; after a step during which a signal arrived, saves (save(step + 1), unless that
        step was just saved) and exits with a message saying how to resume."""
        self.in_loop = True
        try:
            for step in steps:
                yield step
                if self._stop_everywhere():
                    if (self.rank == 0 or self.collective_save) and checkpoint_step(self.out_dir) != step + 1:
                        save(step + 1)
                    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") \
                        else f"{self.stage}.py"
                    signum = self.signal or signal.SIGTERM  # a rank that got none stops with the others
                    if self.rank == 0:
                        log(f"stopped by {signal.Signals(signum).name} after step {step + 1}; checkpoint "
                            f"{last_good_checkpoint(self.out_dir)}. Resume with: python {script} "
                            f"--out_dir={self.out_dir} --resume=true   (the saved settings are restored)")
                    self.close()
                    raise StopRequested(128 + signum)
        finally:
            self.in_loop = False

    def _stop_everywhere(self):
        """Whether any rank got a signal (all ranks must stop after the same step, or the others would wait in
        the next collective): one tiny all-reduce per step under torchrun, nothing otherwise."""
        return ranks_reduce(float(self.signal is not None), "max") > 0

    def close(self):
        """Restore the signal handlers and release the lock (also done at exit, and by a later run of this process)."""
        for signum, h in self._old_handlers.items():
            signal.signal(signum, h)
        self._old_handlers = {}
        release_lock(self.out_dir, self._lock)
        self._lock = None
        if getattr(self, "_created_dir", False):
            try:
                os.rmdir(self.out_dir)  # only succeeds when nothing was written
            except OSError:
                pass


def start_run(cfg, stage):
    """Everything a training stage does before it loads anything:
    - validates the config (one line per bad value);
    - takes the lock `<out_dir>/run.lock` (owner's pid and host; a lock whose process is gone is stale and replaced);
    - fresh run: refuses an out_dir that holds a checkpoint or metrics unless --overwrite=true (then deletes them);
    - --resume=true: finds the checkpoint, restores the saved training config for every flag not given, prints the
      flags that differ, refuses a change that would not apply (see FREE_ON_RESUME / NEVER_ON_RESUME);
    - installs the SIGTERM/SIGINT handlers (see Run.loop)."""
    validate_config(cfg)
    out = cfg.out_dir
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    run = Run(cfg, stage, None)
    run._created_dir = created  # a run refused before writing anything leaves no empty out_dir behind
    try:
        if run.rank == 0:
            run._lock = acquire_lock(out)
        if getattr(cfg, "resume", False):
            run.ckpt = find_checkpoint(out, hint="Nothing to resume: drop --resume=true to start a fresh run.")
            restore_config(cfg, read_meta(run.ckpt), stage)
        else:
            existing = previous_run_files(out) if run.rank == 0 else []
            if existing and not getattr(cfg, "overwrite", False):
                raise SystemExit(f"error: {out} already holds a run ({', '.join(existing)}). Pass --resume=true to "
                                 f"continue it, --overwrite=true to replace it, or choose another --out_dir.")
            for name in existing:
                p = os.path.join(out, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    except BaseException:
        run.close()
        raise
    if threading.current_thread() is threading.main_thread():
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            old = signal.signal(signum, run._handle)
            # a handler left by an earlier run of this process that ended in an exception is not restored
            run._old_handlers[signum] = default if isinstance(getattr(old, "__self__", None), Run) else old
    return run


def previous_run_files(out_dir):
    """What a fresh run in out_dir would replace: checkpoints (any layout) and metrics."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if n == "metrics.jsonl" or CKPT_RE.fullmatch(n))


def restore_config(cfg, meta, stage):
    """Resume: fields not given on the command line take the saved run's values; given ones that differ are
    printed and checked (FREE_ON_RESUME, NEVER_ON_RESUME, --allow_config_change)."""
    saved = meta.get("train_config")
    if not isinstance(saved, dict):
        return
    given = given_keys(cfg)
    changed = []
    for f in dataclasses.fields(cfg):
        if f.name not in saved or f.name in ("resume", "overwrite", "allow_config_change", "out_dir"):
            continue
        cur, old = getattr(cfg, f.name), saved[f.name]
        if f.name not in given:
            if isinstance(cur, float) and isinstance(old, int) and not isinstance(old, bool):
                old = float(old)
            setattr(cfg, f.name, old)
        elif cur != old:
            changed.append((f.name, old, cur))
    if changed:
        log("resume: changed from the saved run: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changed))
    never = [c for c in changed if c[0] in NEVER_ON_RESUME]
    if never:
        k, o, n = never[0]
        raise SystemExit(f"error: --{k}={n} cannot apply to a resumed run (it was {o!r}): a resumed run continues "
                         f"from its own checkpoint. Drop the flag, or start a new run in another --out_dir.")
    fixed = [c for c in changed if c[0] not in FREE_ON_RESUME and not c[0].endswith("_interval")]
    if fixed and not getattr(cfg, "allow_config_change", False):
        names = ", ".join(f"--{k} ({o!r} -> {n!r})" for k, o, n in fixed)
        raise SystemExit(f"error: resuming with changed {names}: the run was trained with the saved values. "
                         f"Drop the flag(s) to continue as saved, or pass --allow_config_change=true to apply them.")
    validate_config(cfg)


# -- the lock

def acquire_lock(out_dir):
    """Create <out_dir>/run.lock exclusively, holding {"pid", "host", "argv", "started"}. An existing lock of a
    live process on this host refuses the run; of a dead one (or of this very process: an earlier run in it
    ended by an exception) it is stale and replaced."""
    path = os.path.join(out_dir, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv, "started": time.strftime("%F %T"),
          "token": os.urandom(8).hex()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
                pid, host = int(owner["pid"]), owner.get("host")
            except (OSError, ValueError, KeyError, TypeError):
                owner, pid, host = {}, None, None  # unreadable (a crash while writing it): stale
            if pid is not None and pid != os.getpid():
                if host != socket.gethostname():
                    raise SystemExit(f"error: {out_dir} is locked by pid {pid} on host {host} ({path}). If no run is "
                                     f"using it there, delete {path}.")
                if _pid_alive(pid):
                    raise SystemExit(f"error: another run (pid {pid}, started {owner.get('started')}) is using "
                                     f"{out_dir}. Wait for it, stop it, or choose another --out_dir.")
            if pid != os.getpid():
                log(f"note: removing a stale lock {path} (pid {pid} is gone)")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, out_dir, me)
        return me
    raise SystemExit(f"error: could not take the lock {path}; another run may be starting in {out_dir}")


def release_lock(out_dir, me):
    """Remove the lock if it is still ours."""
    if me is None:
        return
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        with open(path) as f:
            owner = json.load(f)
        if owner.get("token") == me["token"]:
            os.remove(path)
    except (OSError, ValueError):
        pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
