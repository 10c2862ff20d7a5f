# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first, pinned to a CPU build that the project's range (torch>=2.4) then accepts as is:
# asking for a bare `torch` on a fresh machine can pull a CUDA build of several GB.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint types unit bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[all]'
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The dashboard's browser test drives Debian's Chromium (Playwright never downloads a browser).
$(VENV)/.browser: $(VENV)/.dev
	command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q && apt-get install -y -q chromium >/dev/null)
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/slipstream demo

test: $(VENV)/.browser lint types unit

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

types: $(VENV)/.dev
	$(VENV)/bin/mypy

unit: $(VENV)/.browser
	$(PY) -m pytest -q

bench: $(VENV)/.dev
	$(VENV)/bin/slipstream bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
