# Two commands set up a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: serve test install install-test clean

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

clean:
	rm -rf $(VENV) build *.egg-info
