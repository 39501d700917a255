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

.PHONY: setup demo demo-data pretrain sft grpo eval report test clean-demo bench-kernels gpu data bench-dedup

setup: $(STAMP)

# --system-site-packages: a machine that already has torch (a GPU box's CUDA build) keeps it
$(STAMP): requirements.txt
	test -x $(P) || $(PY) -m venv --system-site-packages $(VENV)
	$(P) -c "import torch" 2>/dev/null || $(P) -m pip install -q $(TORCH)
	$(P) -m pip install -q -r requirements.txt
	touch $(STAMP)

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
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory demo-data pretrain sft grpo eval report && \
	echo "demo finished in $$(( $$(date +%s) - start )) s; report: $(OUT)/report.md"

test: setup
	$(P) -m pytest -q tests

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

bench-kernels: setup
	$(P) bench/kernels.py

# the one command to run on a GPU machine: GPU tests + benchmarks, raw output under bench/results/
gpu:
	bash bench/gpu.sh

clean-demo:
	rm -rf $(OUT)
