# The two README commands: `make quickstart` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
EXTRAS_RUN := coordinator,onnxruntime,llama-cpp
EXTRAS_TEST := coordinator,onnxruntime,onnxruntime-genai,olive,llama-cpp,serving,hf,openvino,mlx,qai-hub,postgres,dev
# llama.cpp build flags for llama-cpp-python, from this CPU's instruction sets. The native
# build crashes on CPUs with AMX (inside ggml's AMX matmul), so on x86 the flags name each
# extension the CPU has (/proc/cpuinfo) and leave AMX out; elsewhere llama.cpp's defaults.
# Override for your machine, e.g. `make quickstart LLAMA_CMAKE_ARGS="-DGGML_METAL=ON"`.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),-D$(2)=ON,-D$(2)=OFF)
LLAMA_CMAKE_ARGS ?= $(if $(CPU_FLAGS),-DGGML_NATIVE=OFF $(call cpu_has,avx,GGML_AVX) \
	$(call cpu_has,avx2,GGML_AVX2) $(call cpu_has,fma,GGML_FMA) $(call cpu_has,f16c,GGML_F16C) \
	$(call cpu_has,avx_vnni,GGML_AVX_VNNI) $(call cpu_has,avx512f,GGML_AVX512) \
	$(call cpu_has,avx512_vnni,GGML_AVX512_VNNI) $(call cpu_has,avx512_bf16,GGML_AVX512_BF16))
# pip's wheel cache does not tell builds with different flags apart (a wheel built on
# another CPU crashes with SIGILL here), so the llama-cpp-python wheel is built once per
# version and flag set into its own folder and installed from there.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_WHEELS := $(HOME)/.cache/edgefarm/llama-cpp-wheels/$(shell echo "$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)" | sha256sum | cut -c1-16)

.PHONY: quickstart test install install-dev llama-cpp lint typecheck protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

llama-cpp: $(BIN)/python
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) with: $(LLAMA_CMAKE_ARGS)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel -q --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi
	$(PIP) install -q -c constraints.txt --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl

# llama.cpp's own HF -> GGUF converter, from the sdist of the llama-cpp-python installed
# (reused when already fetched): coordinator/conversion/llama_converter.py.
FETCH_CONVERTER := $(BIN)/python -m coordinator.conversion.llama_converter fetch

install: llama-cpp
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS_RUN)]"
	$(FETCH_CONVERTER)

install-dev: llama-cpp
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS_TEST)]"
	$(FETCH_CONVERTER)

quickstart: install
	$(BIN)/edgefarm quickstart

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy edgefarm agent coordinator results inventory protos

protos:
	$(BIN)/python protos/generate.py

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy edgefarm agent coordinator results inventory protos
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
