# Two entry points for a fresh machine; each sets up its own virtual environment first.
#   make demo   the built-in demo run (tiny LLaVA on the demo mixture, CPU): stage 1 (caption
#               alignment) when its checkpoint is missing, then stage 2 (TIVE select-then-train)
#   make test   the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU build for laptops and CI; on a GPU machine install the CUDA build of torch first instead.
TORCH ?= torch==2.13.0

STAGE1_CKPT := runs/demo_stage1/checkpoints/stage1.ckpt

.PHONY: demo smoke test install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Written only at stage 1's last epoch, so an interrupted stage 1 reruns.
$(STAGE1_CKPT): | $(VENV)/.installed
	$(PY) -m lightning_tive fit --config configs/demo_stage1.yaml --overwrite true

demo: $(STAGE1_CKPT)
	$(PY) -m lightning_tive fit --config configs/demo.yaml --overwrite true

smoke: $(VENV)/.installed
	$(PY) -m lightning_tive fit --config configs/demo.yaml --config configs/smoke.yaml --overwrite true

test: $(VENV)/.installed
	$(PY) -m pytest
