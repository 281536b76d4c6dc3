# Set-up and checks. `make demo` runs the main job, `make test` the whole test suite; both
# create .venv and install the pinned dependencies first. --no-cache-dir: the CUDA build of torch
# and its NVIDIA libraries are several GB; a second copy in pip's cache has filled CI disks.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format benchmark benchmark-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/pinned.txt requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -r requirements/pinned.txt
	$(BIN)/python -m pip install --quiet --no-cache-dir --no-deps -r requirements/no-deps.txt
	$(BIN)/python -m pip install --quiet --no-cache-dir --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/python -m m4oe.demo out/demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmark: setup
	$(BIN)/python benchmarks/moe_block.py

# End-to-end CPU comparison with MONAI SwinUNETR and an nnU-Net-style 3D U-Net (slow: see
# benchmarks/README.md). The peers run on 240x240x96 voxels, their time scaled by window count.
# Needed only here: the U-Net from dynamic-network-architectures (0.3.1; 0.4 requires timm<1.0.23)
# and einops, which MONAI's SwinUNETR imports.
benchmark-peers: setup
	$(BIN)/python -m pip install --quiet --no-cache-dir einops==0.8.2 dynamic-network-architectures==0.3.1
	$(BIN)/python benchmarks/peers.py --peer-slices 96 --peer-plane 240

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .ruff_cache
