# The two README commands: `make quickstart` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
EXTRAS_RUN := coordinator,onnxruntime,llama-cpp
EXTRAS_TEST := coordinator,onnxruntime,llama-cpp,hf,openvino,mlx,qai-hub,postgres,dev
# llama.cpp build flags for llama-cpp-python. The default native build crashes on CPUs
# with AMX (inside ggml's AMX matmul); this portable AVX-512 set avoids it. Override for
# your CPU, e.g. `make quickstart LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON"` or "-DGGML_METAL=ON".
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
export CMAKE_ARGS ?= $(LLAMA_CMAKE_ARGS)

.PHONY: quickstart test install install-dev lint typecheck protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS_RUN)]"

install-dev: $(BIN)/python
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS_TEST)]"

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
