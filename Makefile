# Two commands do everything: `make demo` (train MNIST offline, write sample grids) and `make test`.
# Both create the virtual environment first. torch is pinned and installed before the package so
# that a CPU machine gets the CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
OUT ?= runs/demo

.PHONY: venv demo test test-compat bench bench-finetune bench-bf16 bench-distill gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/twinflow train --config configs/mnist_twinflow.yaml --out $(OUT)
	$(BIN)/twinflow sample --checkpoint $(OUT) --preset 1nfe --per-class 10 --grid $(OUT)/sample_1nfe.png --npz $(OUT)/sample_1nfe.npz

test: venv
	$(BIN)/python -m pytest -q

# The diffusers-facing tests on the oldest supported diffusers release and the newest (outside CI).
test-compat: venv
	bash .ci/compat $(COMPAT_VERSIONS)

bench: venv
	$(BIN)/python benchmarks/report.py --out benchmarks/results

bench-finetune: venv
	$(BIN)/python benchmarks/finetune_cost.py --out benchmarks/results

bench-bf16: venv
	$(BIN)/python benchmarks/bf16_targets.py --out benchmarks/results

gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py

bench-distill: venv
	$(BIN)/python benchmarks/distill.py --out benchmarks/results/distill

clean:
	rm -rf $(VENV) runs
