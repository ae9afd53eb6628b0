# Two commands work on a fresh machine with only python3 >= 3.11: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vdi-transfer serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Each part prints its figures; bench fails if any part missed a target, after running all.
bench: $(STAMP)
	@status=0; \
	for part in versus_imageio convert chains latency; do \
		$(BIN)/python tests/bench/$$part.py || status=1; \
	done; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .bench build *.egg-info .pytest_cache .ruff_cache
