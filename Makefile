# Two commands on a fresh machine: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_DIR ?= runs/fashion_mnist_unet_cfm
# accelerate launch gives each process one CPU thread unless told otherwise.
NPROC := $(shell nproc 2>/dev/null || echo 1)

.PHONY: setup train test test-unit lint clean

setup: $(STAMP) $(FASHION_MNIST)

# torch first, pinned as a pair: other torch/torchvision pairs break the imports.
$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -r requirements.txt
	touch $(STAMP)

# Fashion-MNIST from Debian when apt is usable; otherwise the loader falls back to the Hub copy.
$(FASHION_MNIST):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		|| echo "warning: could not install dataset-fashion-mnist; the Hub copy will be used"; \
	else \
		echo "warning: apt-get not usable; Fashion-MNIST will be read from the Hub copy"; \
	fi

train: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(NPROC) \
		train_cfm.py --config configs/fashion_mnist_unet_cfm.yaml --output_dir $(RUN_DIR)

# The tiers: tests/unit runs no script (the loop to iterate with), tests/scripts runs each script end to end,
# tests/distributed launches several processes. Test files run in parallel, one per worker, the longest first.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST) --timeout 900 tests/distributed tests/scripts tests/unit

test-unit: setup
	$(PYTEST) --timeout 300 tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
