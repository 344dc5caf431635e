# sentilens: `make demo` and `make test` each create/refresh .venv, install torch (CPU build
# unless a torch is already there), install the project, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first so that no later requirement pulls the CUDA build on a CPU machine.
# Override for a GPU machine: make TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <cuda index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo-out
DEMO_SIZE ?= full

.PHONY: install demo test test-fast lint clean browser docs docs-numbers

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping the torch already installed" || \
		$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sentilens demo --out $(DEMO_OUT) --size $(DEMO_SIZE)

# The web page's browser test drives Debian's Chromium: installed here when missing and running as root
# (elsewhere the test skips and says why).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq chromium chromium-driver >/dev/null || \
			echo "Chromium not installed: the browser test will skip"; }

test: install browser
	$(PY) -m pytest -q

# The quick loop while developing (under a minute on 2 cores): everything but the tests marked `slow`,
# which train real models (tiny LLaVA, fusion runs, the demo, 2-process launches). `make test` runs all.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The guide (mkdocs, material theme) served at http://127.0.0.1:8000 while you edit it; `make test` builds it
# with --strict (tests/test_docs_site.py). docs-numbers rewrites the measured figures the pages quote from
# benchmarks/results/*.json (tests/test_doc_numbers.py fails when they differ).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-numbers: install
	$(PY) benchmarks/doc_numbers.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache site
