# make serve: install if needed, build the default model, serve it with 2 API servers.
# make test:  install if needed, run the test suite.
# make lint:  ruff, and mypy (strict) on apiserver/ and ipc/.
# make bench-smoke: `fanin bench sweep` at CI size on the CPU (two configurations, seconds each).
# make soak: 30 minutes of mixed load with leaving clients, 2x bursts and one API-server kill,
#            then the leak checks (not in CI); results in soak-results/ (MINUTES=30 to change).
# make install-lb: HAProxy from the distribution's packages (tests/integration/test_load_balancer.py).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
# pip takes these two from local disk on the project's machines; pin them first so nothing
# else drags in a different build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install serve test lint install-lb bench-ipc bench-smoke soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test,bench]' $(TORCH_PINS)
	touch $(STAMP)

serve: install
	$(BIN)/fanin serve --api-server-count 2 --port $(PORT)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check apiserver engine_core ipc tests bench
	$(BIN)/ruff format --check apiserver engine_core ipc tests bench
	$(BIN)/mypy

# Debian/Ubuntu packages; root, or sudo where it is there. Without HAProxy the test skips.
install-lb:
	command -v haproxy >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q haproxy; }

bench-ipc: install
	$(BIN)/python bench/ipc_bench.py

# No timing is checked: --strict fails unless both servers start and stop cleanly, every
# request succeeds and the table and plot are written. Results go to a temporary folder.
bench-smoke: install
	out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	$(BIN)/fanin bench sweep --strict --configs inline:1x1 pool:2x1 --max-concurrency 4 \
		--image-size 256x192 --output-len 4 --ignore-eos --warmup-seconds 1 --duration 4 \
		--num-prompts 400 --no-progress --result-dir "$$out"

MINUTES ?= 30
soak: install
	$(BIN)/python -m bench.soak --minutes $(MINUTES) --result-dir soak-results

clean:
	rm -rf $(VENV) build *.egg-info
