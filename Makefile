# Fresh-machine entry points. Each target sets up .venv itself (idempotent) first.
VENV := .venv
SETUP := bash envs/local/setup.sh $(VENV)
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test clean

setup:
	@$(SETUP)

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

clean:
	rm -rf demo runs .pytest_cache
