# Two commands set up a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: serve test install install-test clean gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch goes in first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
$(VENV)/.torch: | $(PY)
	$(PIP) install -q $(TORCH_PIN)
	touch $@

# a new or changed .proto recompiles: install runs setup.py's build_protos
$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/glm_ray/v1/*.proto) $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/glm-ray serve $(SERVE_ARGS)

# pytest exits 5 when it collects nothing: say so loudly instead of a bare make error.
test: install-test
	@RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# What a lent GPU machine (Python 3.12, no network) needs for .ci/gpu-check: DeepSpeed (pure Python,
# built here; its ops JIT-build there with nvcc), deepspeed-kernels (its CUTLASS MoE GEMM), the
# pydantic and hjson DeepSpeed imports, and the protobuf and grpcio our generated modules were made by.
GPU_WHEELS := build/gpu-wheels
GPU_PIP := $(PIP) download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --implementation cp -d $(GPU_WHEELS)
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(GPU_PIP) --no-deps deepspeed-kernels hjson \
	  "protobuf==$$($(PY) -c 'import google.protobuf as p; print(p.__version__)')" \
	  "grpcio==$$($(PY) -c 'import grpc; print(grpc.__version__)')"
	$(GPU_PIP) "pydantic==$$($(PY) -c 'import pydantic; print(pydantic.VERSION)')"
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) deepspeed
	@du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info
