# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PY := .venv/bin/python
export VK_ICD_FILENAMES ?= /usr/share/vulkan/icd.d/lvp_icd.json
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint demo splits bench clean

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
# process on two busy cores made the tiny model 10-60x slower (measured).
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 tests

# The study at tiny scale: SFT warm-up -> PPO, an SFT baseline, OOD evaluation (scripts/demo.sh).
demo: setup
	PY=$(PY) bash scripts/demo.sh

# Every benchmark, one after the other (each prints RESULT lines with ratios measured in one run).
bench: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_sampling.py --threads 1
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_update.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_rollout.py

# The expert on every split, as a contact sheet (docs/splits.png).
splits: setup
	$(PY) envs.py --split all --episodes 2 --out results/contact_sheet.png

clean:
	rm -rf runs results demos demo
