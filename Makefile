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
	$(PY) -m pip install -q -e ".[dev,llamacpp]"
	touch $(STAMP)

# The main job on the default model (SmolLM2-135M): TurboBoA 4-bit, group 128, then perplexity of the float
# model and of the quantized one on the same WikiText-2 windows. Small calibration so it runs on a laptop CPU.
DEMO_OUT   ?= out/demo-turboboa-w4g128
DEMO_CALIB ?= --nsamples 16 --seqlen 512
DEMO_EVAL  ?= --seqlen 512 --max-windows 16

demo: venv
	$(VENV)/bin/turboboa quantize smollm2-135m --method turboboa --bits 4 --group-size 128 $(DEMO_CALIB) -o $(DEMO_OUT)
	$(VENV)/bin/turboboa eval smollm2-135m $(DEMO_EVAL)
	$(VENV)/bin/turboboa eval $(DEMO_OUT) $(DEMO_EVAL)

test: venv
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out
