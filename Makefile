# Two entry points for a fresh machine; each sets up its own virtual environment first.
#   make demo   the built-in demo run (tiny LLaVA on the demo mixture, CPU): stage 1 (caption
#               alignment) when its checkpoint is missing, then stage 2 (TIVE select-then-train)
#   make test   the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch is installed first, pinned, so no range pulls another build in later. Which build you get
# depends on the index: PyPI's Linux wheel of 2.13.0 is the CUDA build (several GB), macOS/Windows
# get a CPU build; for a CPU-only wheel on Linux use the PyTorch index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

STAGE1_CKPT := runs/demo_stage1/checkpoints/stage1.ckpt

.PHONY: demo smoke test install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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

# Tests run in parallel, one worker per core up to 4 (each worker takes 1-3 GB; multi-process tests start more).
test: $(VENV)/.installed
	$(PY) -m pytest -n auto --maxprocesses 4
