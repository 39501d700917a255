"""
What every stage shares: command-line config, device choice, checkpoints, metrics lines.

A checkpoint is a directory `<out_dir>/ckpt/`:
    model.pt        weights (state_dict)            -- torch.load(weights_only=True): no code runs on load
    optim.pt        optimizer state                 -- likewise
    rng.pt          torch RNG states
    meta.json       stage, step, model config, training config, tokenizer fingerprint, data position,
                    numpy/python RNG states
    tokenizer.json  the tokenizer
It is written into `ckpt.tmp/` and then swapped in with renames, so a crash mid-write leaves the
previous checkpoint whole (at worst as `ckpt.old/`, which load_checkpoint falls back to).
"""
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
import sys
import time
import tokenize

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
    cfg.__dict__["_given_keys"] = given
    validate_config(cfg)
    return cfg


def given_keys(cfg):
    """The fields the user set: those parse_config saw on the command line, or (a config built in Python)
    those that differ from the dataclass defaults."""
    if "_given_keys" in cfg.__dict__:
        return set(cfg.__dict__["_given_keys"])
    default = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def field_comments(cls):
    """{field: help} from `metadata={"help": ...}` or else the comment written beside the field in the source
    (continued on following comment-only lines at the same column)."""
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
             comments.get(f.name, "")) for f in dataclasses.fields(cfg)]
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


def check_finite(loss, step, ckpt_hint):
    if not torch.isfinite(loss).all():
        raise SystemExit(f"error: loss is {loss.item()} at step {step}. Lower --lr (or check the data); "
                         f"nothing was saved after the last good checkpoint ({ckpt_hint}).")


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(out_dir, *, stage, step, model, tok, train_cfg, optimizer=None, extra=None, np_rng=None):
    final = os.path.join(out_dir, "ckpt")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
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
    if os.path.exists(final):  # else a crash left only ckpt.old: keep it until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    dir_fd = os.open(out_dir, os.O_RDONLY)  # make the renames durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def find_checkpoint(path):
    """Accept a stage directory (with ckpt/ inside) or a ckpt directory itself."""
    for cand in (os.path.join(path, "ckpt"), path, os.path.join(path, "ckpt.old")):
        if os.path.exists(os.path.join(cand, "meta.json")):
            return cand
    raise SystemExit(f"error: no checkpoint at {path} (expected {path}/ckpt/meta.json). "
                     f"Run the previous stage first, or pass its --out_dir as --init_from.")


def load_checkpoint(path, device="cpu", expect_stage=None, kernels="torch"):
    """-> (model, tokenizer, meta, ckpt_dir). Ends with one clear line on anything wrong."""
    ckpt = find_checkpoint(path)
    try:
        with open(os.path.join(ckpt, "meta.json")) as f:
            meta = json.load(f)
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
    cfg = ModelConfig(**meta["model_config"], kernels=kernels)
    try:  # the loaded tensors become the parameters: no second copy, dtype kept (an import's bf16 stays bf16)
        model = GPT.from_state_dict(cfg, state)
    except RuntimeError as e:
        raise SystemExit(f"error: weights in {ckpt} do not fit its model config ({str(e)[:160]})")
    return model.to(device), tok, meta, ckpt


def load_training_state(ckpt, optimizer, np_rng=None):
    """Restore optimizer and RNG states for --resume."""
    meta = json.load(open(os.path.join(ckpt, "meta.json")))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optim.pt"), weights_only=True))
    rng = torch.load(os.path.join(ckpt, "rng.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if np_rng is not None and meta.get("numpy_rng"):
        np_rng.bit_generator.state = meta["numpy_rng"]
    if meta.get("python_rng"):
        random.setstate(_tuplify(meta["python_rng"]))
    return meta
