# The two commands of the README, and their helpers. Each sets up .venv/ first (fast when it is
# up to date). The tests, the quickstart and the benchmarks set their own offline environment
# (dskd_devkit.axolotl_runs.OFFLINE_ENV).

.PHONY: venv venv-compat quickstart test test-fast test-compat lint format

venv:
	@bash scripts/setup_venv.sh

quickstart: venv
	.venv/bin/python scripts/quickstart.py

# lint, then every test (unit and end to end through Axolotl's CLI): the README's test command, CI
test: lint
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# the in-process unit tests only (no Axolotl subprocess): under two minutes on two cores
test-fast: venv
	.venv/bin/python -m pytest -q tests/unit $(PYTEST_ARGS)

# Axolotl 0.21 on Python 3.12 in .venv-compat/: the unit tests and the CLI runs (same vocabulary
# with checkpoints, a kill and a resume; cross-tokenizer; packing; full fine-tune with 8-bit teacher),
# the teacher cache (built with the plugin's command, trained from) and the two-process torchrun scenarios.
# Another release: make test-compat AXOLOTL_VERSION=0.20.0 VENV=.venv-compat-0.20
AXOLOTL_VERSION ?= 0.21.0
VENV ?= .venv-compat

venv-compat:
	@AXOLOTL_VERSION=$(AXOLOTL_VERSION) VENV=$(VENV) bash scripts/setup_compat_venv.sh

test-compat: venv-compat
	$(VENV)/bin/python -m pytest -q tests/unit tests/e2e/test_train_cli.py tests/e2e/test_teacher_cache_cli.py \
	  tests/e2e/test_data_parallel.py $(PYTEST_ARGS)

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: venv
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
