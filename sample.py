"""
Sample from a checkpoint, or chat with it.

    python sample.py --ckpt=out/pretrain --prompt="Once upon a time"           # continue text (a base model)
    python sample.py --ckpt=out/sft --prompt="What is 3 + 4?" --n_samples=4    # one chat turn, 4 answers
    python sample.py --ckpt=out/sft --chat=true                                 # interactive chat
    python sample.py --ckpt=out/pretrain                                        # unconditional, from <|bos|>

The checkpoint says its format: a pretrained one ("plain") continues the prompt as text, as
nanoGPT's sample.py does; an SFT/GRPO one ("chat") answers it as a user turn in its chat format
(tasks.chat_prompt_ids), and in --chat mode keeps the conversation (oldest turns are dropped when
it no longer fits the context; '/reset' starts over, '/exit' or Ctrl-D ends). Sampling goes through
the one sampling path (engine.generate): temperature (0 = greedy), top-k, top-p.
"""
import sys
from dataclasses import dataclass

import torch

from common import load_checkpoint, log, parse_config, pick_device, pick_kernels, set_threads
from engine import generate, stop_tokens_for
from tasks import chat_prompt_ids


@dataclass
class SampleConfig:
    ckpt: str = "out/sft"          # a stage directory (with ckpt/ inside) or a ckpt directory
    prompt: str = ""               # "" = start from <|bos|> (base models only)
    chat: bool = False             # interactive conversation (chat checkpoints)
    n_samples: int = 1             # completions per prompt
    max_new_tokens: int = 256
    temperature: float = 0.8       # 0 = greedy
    top_k: int = 50                # 0 = off
    top_p: float = 1.0             # nucleus sampling; 1 = off
    seed: int = 1337
    device: str = "auto"
    kernels: str = "auto"


def check_options(cfg, max_seq_len):
    if cfg.n_samples < 1:
        raise SystemExit(f"error: --n_samples must be >= 1, got {cfg.n_samples}")
    if cfg.temperature < 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise SystemExit("error: --temperature must be >= 0, --top_k >= 0 and --top_p in (0, 1]")
    if not 0 < cfg.max_new_tokens < max_seq_len:
        raise SystemExit(f"error: --max_new_tokens must be between 1 and {max_seq_len - 1} (the model's context "
                         f"is {max_seq_len} tokens), got {cfg.max_new_tokens}")


def prompt_tokens(tok, fmt, messages_or_text):
    """What the model continues: text after <|bos|> (plain), or the conversation + <|assistant|> (chat)."""
    if fmt == "chat":
        return chat_prompt_ids(tok, messages_or_text)
    return [tok.bos_id] + tok.encode(messages_or_text)


def sample(model, tok, prompt, cfg, stops, generator):
    """n_samples completions (token ids) of one prompt, each ending at a stop id (engine.stop_tokens_for)."""
    return generate(model, [prompt] * cfg.n_samples, cfg.max_new_tokens, stop_tokens=stops,
                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)


def text_of(tok, ids, stops):
    return tok.decode(ids[:-1] if ids and ids[-1] in stops else ids)


def chat_loop(model, tok, cfg, generator, read=input, write=print):
    """Read user turns until '/exit' or end of input; answer each with the first sample."""
    budget = model.cfg.max_seq_len - cfg.max_new_tokens
    history = []
    write("chat: type a message; '/reset' starts over, '/exit' or Ctrl-D ends.")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = prompt_tokens(tok, "chat", history)
        while len(prompt) > budget and len(history) > 1:  # forget the oldest exchange
            history = history[2:]
            prompt = prompt_tokens(tok, "chat", history)
        if len(prompt) > budget:
            write(f"(that message is {len(prompt)} tokens; with --max_new_tokens={cfg.max_new_tokens} at most "
                  f"{budget} fit the model's context; send a shorter one)")
            history = []
            continue
        stops = stop_tokens_for(tok, "chat")
        answer = text_of(tok, sample(model, tok, prompt, cfg, stops, generator)[0], stops)
        history.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
    return history


def main(cfg, read=input, write=print):
    set_threads()
    device = pick_device(cfg.device)
    model, tok, meta, ckpt = load_checkpoint(cfg.ckpt, device, kernels=pick_kernels(cfg.kernels, device))
    model.eval()
    fmt = meta.get("fmt", "chat")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    log(f"sample: {meta['stage']} checkpoint {ckpt} (step {meta['step']}, {fmt} format), temperature "
        f"{cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}")
    if cfg.chat:
        if fmt != "chat":
            raise SystemExit(f"error: {ckpt} is a '{meta['stage']}' checkpoint in plain text format; --chat needs an "
                             f"SFT or GRPO checkpoint. Use --prompt=... to continue text with this one.")
        check_options(cfg, model.cfg.max_seq_len)
        return chat_loop(model, tok, cfg, generator, read, write)
    check_options(cfg, model.cfg.max_seq_len)
    if fmt == "chat" and not cfg.prompt:
        raise SystemExit(f"error: {ckpt} is a chat checkpoint: give it a message with --prompt=\"...\" or use --chat=true")
    prompt = prompt_tokens(tok, fmt, [{"role": "user", "content": cfg.prompt}] if fmt == "chat" else cfg.prompt)
    if len(prompt) + cfg.max_new_tokens > model.cfg.max_seq_len:
        raise SystemExit(f"error: the prompt is {len(prompt)} tokens; with --max_new_tokens={cfg.max_new_tokens} at "
                         f"most {model.cfg.max_seq_len - cfg.max_new_tokens} fit the model's context. Shorten one.")
    stops = stop_tokens_for(tok, fmt)  # a chat turn ends at end-of-turn; a base model's document at the next <|bos|>
    texts = [text_of(tok, o, stops) for o in sample(model, tok, prompt, cfg, stops, generator)]
    for i, t in enumerate(texts):
        if cfg.n_samples > 1:
            write(f"--- sample {i + 1}/{cfg.n_samples}")
        write((cfg.prompt if fmt == "plain" else "") + t)
    sys.stdout.flush()
    return texts


if __name__ == "__main__":
    main(parse_config(SampleConfig()))
