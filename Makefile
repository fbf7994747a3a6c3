# The two commands of the README, and their helpers. Each sets up .venv/ first (fast when it is
# up to date). The tests, the quickstart and the benchmarks set their own offline environment
# (dskd_devkit.axolotl_runs.OFFLINE_ENV).

.PHONY: venv quickstart test test-fast lint format

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

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: venv
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
