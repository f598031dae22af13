# Two entry points (see README): `make demo` and `make test`. Both set up .venv first and reuse it
# when it is complete for the current pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The setup stamp records the hash of pyproject.toml: a changed dependency list re-runs the install.
STAMP := $(VENV)/.setup-complete
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= outputs/demo
DEMO_ARGS ?=

.PHONY: setup system-packages demo test test-fast clean-venv

# Debian packages the tests need: chromium + chromium-driver (the serve page's browser test). Skipped
# when present; installed with apt-get when this runs as root (CI does), else it says what to run.
SYSTEM_PACKAGES := chromium chromium-driver
system-packages:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "setup: chromium and chromedriver present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "setup: installing $(SYSTEM_PACKAGES) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "setup: chromium is missing; install it with: sudo apt-get install $(SYSTEM_PACKAGES)" \
		     "(the browser test skips without it, and fails under CI=true)"; \
	fi

setup: system-packages
	@want=$$(sha256sum pyproject.toml | cut -d' ' -f1); \
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$want" ]; then \
		echo "setup: $(VENV) is complete, reusing it"; \
	else \
		set -e; \
		[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV); \
		$(BIN)/pip install --quiet --upgrade pip; \
		$(BIN)/pip install --quiet $(TORCH_PINS); \
		$(BIN)/pip install --quiet -e '.[test]'; \
		$(BIN)/detr ops build || echo "setup: native kernels not built, the reference backend will be used (detr ops info says why)"; \
		echo "$$want" > $(STAMP); \
		echo "setup: $(VENV) ready"; \
	fi

# The main job on the embedded defaults (detr/demo.py): the generated shapes dataset -> train the
# tiny Deformable DETR preset (7-9 minutes on 2 CPU cores) -> evaluate its best checkpoint, all
# tracked in MLflow (sqlite:///mlflow.db) -> the command that opens the MLflow UI on the result.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/detr demo --out $(DEMO_DIR) $(DEMO_ARGS)

# The whole test suite, slow tests included, as CI runs it; the 25 slowest tests are listed at the end, to keep
# the run under 25 minutes.
test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "slow or not slow" --durations=25 $(PYTEST_ARGS)

test-fast: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
