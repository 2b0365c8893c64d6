# turboboa: quick start is `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# torch==2.13.0 first: on a CPU machine that is the CPU build on disk; a plain
# `torch` requirement would otherwise pull a multi-gigabyte CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/turboboa quantize --method gptq --bits 4 --group-size 128 --nsamples 16 --seqlen 512 -o out/demo-gptq-w4g128
	$(VENV)/bin/turboboa eval out/demo-gptq-w4g128 --seqlen 512 --max-windows 8

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out
