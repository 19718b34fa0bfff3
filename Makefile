# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PY := .venv/bin/python
# SAPIEN's Vulkan driver: Mesa's lavapipe where no NVIDIA GPU works, none set where one does
# (the loader finds NVIDIA's driver itself; scripts/vulkan_icd.sh). Your own VK_ICD_FILENAMES wins.
ifeq ($(origin VK_ICD_FILENAMES),undefined)
VK_ICD_FILENAMES := $(shell bash scripts/vulkan_icd.sh)
ifneq ($(VK_ICD_FILENAMES),)
export VK_ICD_FILENAMES
endif
endif
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: ablations setup test lint demo demo-maniskill study pretrain splits bench clean

setup: .venv/.installed
	@bash scripts/setup_vulkan.sh

# Re-installs only when requirements.txt changes.
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

lint: setup
	$(PY) -m ruff check .

# One torch thread per process: the env workers need the other core, and two threads per
# process on two busy cores made the tiny model 10-60x slower (measured). Two pytest workers
# (pytest-xdist): half the suite's time is single-process tests that leave the other core idle.
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 tests

# The study at toy scale on the 2D twin, from the shipped pretrained tiny VLA: SFT warm-up ->
# PPO, an SFT baseline on many demos, then all 16 splits (scripts/demo.sh; GRPO and DPO: make study).
demo: setup
	PY=$(PY) bash scripts/demo.sh

# The same study with 3 training seeds of every stage and more evaluation episodes (68 min
# from a fresh clone of the 2-core host, 2026-12-06; 50 min at its fastest hour, ~3x at slow ones).
study: setup
	PY=$(PY) STUDY=1 bash scripts/demo.sh

# The paper's ablations (critic input, PPO epochs, warm-up, temperature, PPO vs GRPO vs DPO) on the
# twin, 3 training seeds each, one figure per ablation in docs/ablations (scripts/ablations.py; hours).
ablations: setup
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) scripts/ablations.py --output-dir ablations --figures-dir docs/ablations

# The pipeline on the real ManiSkill3 task (a random tiny model: it checks the plumbing only).
demo-maniskill: setup
	PY=$(PY) bash scripts/demo_maniskill.sh

# Pretrain the tiny VLA by pretrain_tiny.py's recipe (streamed demonstrations, the name pairs in
# half of every batch) into assets/tiny-openvla-twin, on 2 cores (50,000 steps: 2 h 52 min on
# 2026-12-06 at ~5 steps/s, more at this machine's slow hours; add --resume to continue).
pretrain: setup
	OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 pretrain_tiny.py

# Every benchmark, one after the other (each prints RESULT lines with ratios measured in one run).
bench: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_sampling.py --threads 1
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_update.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_rollout.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_twin_env.py
	$(PY) benchmarks/bench_ddp.py

# The expert on every split, as a contact sheet (docs/splits.png).
splits: setup
	$(PY) scripts/contact_sheet.py --env twin --split all --episodes 2 --out results/twin_splits.png
	$(PY) scripts/contact_sheet.py --env maniskill --split all --episodes 2 --out results/maniskill_splits.png

clean:
	rm -rf runs results demos demo study

# `make -s print-VK_ICD_FILENAMES`: a variable's value as the targets see it.
print-%:
	@echo '$*=$($*)'
