# The two quick-start commands (`make demo`, `make test`) bootstrap the venv themselves: it is
# (re)built whenever pyproject.toml changes, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Ray on a laptop/CI box: loopback only, no token auth, temp files inside the tree.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
PYTEST_ARGS ?=

.PHONY: venv demo lint test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/captioner demo

# House rules (pyproject.toml [tool.ruff]): lint and format are checked before the tests run.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/captioner bench

clean:
	rm -rf $(VENV) .pytest_cache .tmp
