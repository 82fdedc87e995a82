# Fresh-machine entry points. Each target sets up .venv itself (idempotent) first.
VENV := .venv
SETUP := bash envs/local/setup.sh $(VENV)
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup horovod slurm demo test test-all clean

setup:
	@$(SETUP)

# Horovod 0.28.1 built into .venv once (a few minutes on 2 cores); the test suite runs every backend.
horovod: setup
	@bash envs/local/build-horovod.sh $(VENV)

# Slurm + munge (and shellcheck) from apt for the real single-host cluster of the `slurm` tests;
# without root or apt-get it warns and those tests skip.
slurm:
	@bash envs/local/install-slurm.sh

demo: setup
	@bash scripts/demo.sh

# CI's suite: every test not marked slow (scripts/test.sh says how it runs them).
test: setup horovod slurm
	@bash scripts/test.sh

# Every test, the slow ones included.
test-all: setup horovod slurm
	@bash scripts/test.sh --all

clean:
	rm -rf demo runs .pytest_cache
