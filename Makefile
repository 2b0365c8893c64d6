# turboboa: quick start is `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test accuracy lint bench bench-qwen bench-gemma bench-gpu bench-memory clean

venv: $(STAMP)

# torch==2.13.0 first: on a CPU machine that is the CPU build on disk; a plain
# `torch` requirement would otherwise pull a multi-gigabyte CUDA build.
# llama-cpp-python compiles llama.cpp: a portable AVX2 build (no -march=native), so the library behaves the same on
# every x86-64 host; ggml's AMX kernels, which a native build enables on CPUs that have AMX, crash in
# ggml_backend_amx_mul_mat. -DLLAVA_BUILD=OFF: the multimodal library (mtmd), which turboboa never loads, is not
# compiled. --no-cache-dir: never reuse a wheel built earlier with other flags.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir "llama-cpp-python>=0.3.7"
	$(PY) -m pip install -q -e ".[dev,llamacpp,npu]"
	touch $(STAMP)

# The main job on the default model (SmolLM2-135M), in one command: TurboBoA onto ggml's q4_0 grid (run's
# default when gguf is exported), export model.gguf and model.onnx, check both against the fake-quant model
# (weights bit-identical; llama.cpp and onnxruntime PPL, KL and top-1 on the same WikiText-2 windows, with the
# float model beside them), write report.{json,md,png} and SHA256SUMS into $(DEMO_OUT). The last line printed
# is the report's path. Calibration and evaluation are kept small so it runs on a 2-core CPU in minutes.
DEMO_OUT   ?= out/demo
DEMO_CALIB ?= --nsamples 16 --seqlen 512
DEMO_EVAL  ?= --eval-seqlen 512 --max-windows 8

demo: venv
	$(VENV)/bin/turboboa run smollm2-135m --export gguf,onnx $(DEMO_CALIB) $(DEMO_EVAL) -o $(DEMO_OUT)

# Every benchmark in turn, each resumable: a row is reused only when its recorded settings, data sizes, machine
# and library versions match this run's (bench/provenance.py), every other row is measured and written at once,
# so an interrupted `make bench` continues where it stopped. BENCH_ARGS reaches every script, after its own
# settings: `make bench BENCH_ARGS="--device cuda"`, or BENCH_ARGS=--fresh to measure every row again. The
# *_ARGS are the settings of the committed results in bench/results/ (solver_time: the CPU entry's 16 x 512
# calibration, the GPU entry's 128 x 2048 when BENCH_ARGS names cuda). Hours on a 2-core CPU (README).
BENCH_ARGS    ?=
METHODS_ARGS  ?= --methods rtn,gptq,boa,turboboa --bits 2,3,4 --groups -1,128 --nsamples 16 --seqlen 512 \
                 --eval-seqlen 512 --max-windows 16
TIME_ARGS     ?= --methods boa,turboboa --bits 3 --groups -1 --nsamples 16 --seqlen 512 --eval-seqlen 512 \
                 --max-windows 16 --out bench/results/boa-vs-turboboa-time
SOLVER_ARGS   ?= --blocks 5 --bits 3 --group-size -1 \
                 $(if $(findstring cuda,$(BENCH_ARGS)),--nsamples 128 --seqlen 2048,--nsamples 16 --seqlen 512)
ROTATION_ARGS ?= --nsamples 8 --seqlen 512 --eval-seqlen 512 --max-windows 8
GGUF_ARGS     ?= --nsamples 16 --seqlen 512 --eval-seqlen 512 --max-windows 16
# The default model padded to 256 (--pad-order activation), against llama.cpp's files of the unpadded model: the
# ten file types of bench-qwen.
IQ_ARGS       ?= --model smollm2-135m --presets IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,Q2_K,IQ3_XXS,IQ3_M,Q3_K_S,Q3_K_M,Q4_K_M \
                 --makers llama.cpp+imatrix,turboboa+pad256+act --nsamples 8 --seqlen 512 --eval-seqlen 512 --max-windows 16
# The second reference model (bench-qwen, not part of `make bench`): every width takes every type. Tens of minutes
# per file on a CPU; a GPU (BENCH_ARGS="--device cuda") is the intended machine for our quantizations.
QWEN_ARGS     ?= --model qwen2.5-coder-1.5b --name gguf-vs-llamacpp-qwen2.5-coder-1.5b \
                 --presets IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,Q2_K,IQ3_XXS,IQ3_M,Q3_K_S,Q3_K_M,Q4_K_M \
                 --makers llama.cpp+imatrix,turboboa --nsamples 32 --seqlen 512 --eval-seqlen 512 --max-windows 16
# Gemma 3 (bench-gemma, not part of `make bench`): GPTQ against TurboBoA at 4 bits, group 128, on Gemma-3-270M,
# and `turboboa run` with its defaults (the demo's calibration and windows) exporting GGUF and ONNX, checked.
GEMMA_ARGS    ?= --model gemma-3-270m --methods gptq,turboboa --bits 4 --groups 128 --nsamples 16 --seqlen 512 \
                 --eval-seqlen 512 --max-windows 16 --out bench/results/gemma-3-270m-methods
GEMMA_RUN_ARGS ?= --name gemma-3-270m-run -- gemma-3-270m --export gguf,onnx --gguf-graph $(DEMO_CALIB) $(DEMO_EVAL)
CODEBOOK_ARGS ?= --model qwen2.5-coder-1.5b --blocks 0 --roles q,gate,down --formats iq2_xxs,iq3_xxs --nsamples 8 --seqlen 512
# The GPU timing (bench-gpu, for a CUDA machine): every method with the papers' calibration on Qwen2.5-Coder-1.5B at
# INT2 per channel with rotation (--rotate auto), wall time by phase and peak GPU memory per row.
GPU_ARGS      ?= --model qwen2.5-coder-1.5b --methods rtn,gptq,boa,turboboa --bits 2 --groups -1 --nsamples 128 \
                 --seqlen 2048 --eval-seqlen 2048 --max-windows 16 --device cuda --out bench/results/qwen2.5-coder-1.5b-gpu
# Peak host memory (bench-memory, not part of `make bench`): `turboboa quantize` streamed block by block against the
# whole model loaded (--no-stream), and activations kept in bfloat16 (--calib-dtype) with their PPL cost, on the
# default model and Qwen2.5-Coder-1.5B; 128 x 2048 calibration as well on
# a GPU (BENCH_ARGS="--device cuda"), where it takes minutes instead of hours.
comma         := ,
MEMORY_ARGS   ?= --models smollm2-135m,qwen2.5-coder-1.5b \
                 --calib $(if $(findstring cuda,$(BENCH_ARGS)),16x512$(comma)128x2048,16x512) \
                 --calib-dtypes float32,bfloat16 --eval-windows 16 --eval-seqlen 512 \
                 -- --method gptq --bits 4 --group-size 128
NPU_ARGS      ?= --windows 4 --seqlen 128 --nsamples 16 --calib-seqlen 512

bench: venv
	$(PY) bench/solver_time.py $(SOLVER_ARGS) $(BENCH_ARGS)
	$(PY) bench/methods.py $(TIME_ARGS) $(BENCH_ARGS)
	$(PY) bench/methods.py $(METHODS_ARGS) $(BENCH_ARGS)
	$(PY) bench/rotation.py $(ROTATION_ARGS) $(BENCH_ARGS)
	$(PY) bench/gguf_vs_llamacpp.py $(GGUF_ARGS) $(BENCH_ARGS)
	$(PY) bench/gguf_vs_llamacpp.py $(IQ_ARGS) $(BENCH_ARGS)
	$(PY) bench/npu.py $(NPU_ARGS) $(BENCH_ARGS)

# The accuracy claims on the default model with their thresholds (bench/accuracy.py's docstring): GPTQ 4-bit
# group 128 within 10% of float, TurboBoA <= GPTQ at 4 bits, TurboBoA < GPTQ < RTN at 3 bits, the rotation's
# gain. Run it whenever a change touches solvers, grids or defaults; it writes bench/results/accuracy.{json,md}
# (rows reused only when settings, data, machine and versions match) and fails when a check fails.
bench-qwen: venv
	$(PY) bench/codebook_search.py $(CODEBOOK_ARGS) $(BENCH_ARGS)
	$(PY) bench/gguf_vs_llamacpp.py $(QWEN_ARGS) $(BENCH_ARGS)

bench-gpu: venv
	$(PY) bench/methods.py $(GPU_ARGS) $(BENCH_ARGS)

bench-gemma: venv
	$(PY) bench/methods.py $(GEMMA_ARGS) $(BENCH_ARGS)
	$(PY) bench/run_check.py $(BENCH_ARGS) $(GEMMA_RUN_ARGS)

bench-memory: venv
	$(PY) bench/memory.py $(BENCH_ARGS) $(MEMORY_ARGS)

accuracy: venv
	$(PY) bench/accuracy.py $(BENCH_ARGS)

# Two workers (pytest-xdist), a test file per worker at a time so its module fixtures are built once, each
# computing on one thread (OMP_NUM_THREADS reaches torch in the workers and in the commands they start), so
# the two never contend for the cores; a test that hangs fails after 15 minutes instead of holding the suite.
# The layer contracts (import-linter, [tool.importlinter] in pyproject.toml) first: a forbidden import fails the
# test run before any test does.
test: venv
	$(VENV)/bin/lint-imports
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --timeout 900 --durations=15 tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) out
