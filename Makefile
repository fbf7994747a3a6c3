# The two commands of the README. Both set up .venv/ first (fast when it is up to date).
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: venv quickstart test
venv:
	@bash scripts/setup_venv.sh

quickstart: venv
	.venv/bin/python scripts/quickstart.py

test: venv
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
