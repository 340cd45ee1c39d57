# Two set-up commands: `make demo` (offline demo end to end) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: demo test lint install system-deps bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the HTML report tests (Debian package; needs root, as on CI).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium not found; the browser tests will be skipped"; fi; }

# The whole path on the offline defaults, in $(DEMO)/ (its saevctl.toml records the mined index and SAE).
SAEVCTL := $(abspath $(BIN))/saevctl
demo: $(STAMP)
	mkdir -p $(DEMO)
	cd $(DEMO) && $(SAEVCTL) extract --model demo --images demo --layers 6,10 --out store
	cd $(DEMO) && $(SAEVCTL) train --store store --layer 6 --activation topk --k 32 --width 16x \
	    --batch-size 2048 --lr 1e-3 --out sae $$([ -d sae ] && echo --resume)
	cd $(DEMO) && $(SAEVCTL) mine --sae sae --store store --index index.duckdb
	cd $(DEMO) && $(SAEVCTL) features list --sort freq --limit 10
	cd $(DEMO) && F=$$($(SAEVCTL) features list --sort max --where "img_freq BETWEEN 0.005 AND 0.2" --limit 1 --plain) \
	    && $(SAEVCTL) features top --id $$F && $(SAEVCTL) features show --id $$F
	cd $(DEMO) && $(SAEVCTL) eval all --images demo:64 --store store --recon-max-images 512 --n-boot 500
	cd $(DEMO) && $(SAEVCTL) report --out report --max-features 200
	cd $(DEMO) && $(SAEVCTL) probe --image skimage:chelsea --head saliency --clamp top=0 --out probe-chelsea.png
	cd $(DEMO) && $(SAEVCTL) eval card

# Lint and type checks (configured in pyproject.toml); `make test` runs them before the tests.
lint: $(STAMP)
	$(BIN)/ruff check saevctl tests benchmarks && $(BIN)/mypy

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py --quick

clean:
	rm -rf $(DEMO)
