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
import dataclasses
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

from model import GPT, ModelConfig
from tokenizer import tokenizer_from_json


def parse_config(cfg, argv=None):
    """Override dataclass fields from `--key=value` arguments; unknown keys are an error."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value, got '{arg}'. Keys: {', '.join(fields)}")
        key, val = arg[2:].split("=", 1)
        if key not in fields:
            raise SystemExit(f"error: unknown config key '{key}'. Valid keys: {', '.join(fields)}")
        old = getattr(cfg, key)
        try:
            if isinstance(old, bool):
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(val)
                new = val.lower() in ("true", "1")
            elif old is None:
                new = val
            else:
                new = type(old)(val)
        except ValueError:
            raise SystemExit(f"error: --{key} expects a {type(old).__name__}, got '{val}'")
        setattr(cfg, key, new)
    return cfg


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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


class Metrics:
    """Appends one JSON object per line to <out_dir>/metrics.jsonl and prints a short line."""

    def __init__(self, out_dir, resume_step=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):  # drop lines a crashed run wrote past the checkpoint
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line)
                    except json.JSONDecodeError:  # the half-written last line of a killed run
                        pass
            with open(self.path, "w") as f:
                f.writelines(keep)
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
    model = GPT(cfg)
    try:
        model.load_state_dict(state)
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
