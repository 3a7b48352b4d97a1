# Set-up and everyday tasks. Every target creates the virtual environment from the repo's own files.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv bench clean

$(BIN)/detector: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/detector

demo: venv  ## the main job on the embedded default: local broker, sample world, findings on screen
	$(BIN)/detector demo

test: venv  ## the whole test suite
	$(BIN)/pytest

bench: venv
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
