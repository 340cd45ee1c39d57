# Two set-up commands: `make demo` (offline demo end to end) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO := demo-out

.PHONY: demo test lint install system-deps bench clean

# The package alone for the demo; the test tools (pytest, linters, onnxruntime for the conversion's check,
# datasets for hf: sources) on top for `make test`, so a first `make demo` does not install them (~15 s).
# pip compiles the installed files to bytecode on one core (~30 s of a first install, torch's files mostly);
# compileall does it on every core. Its exit status is ignored: a few files are not meant to compile under this
# Python (torch's py312_intrinsics.py), which pip skips silently too.
SITE = "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
BYTECODE = $(BIN)/python -m compileall -q -j 0 $(SITE) >/dev/null 2>&1 || true
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e .
	$(BYTECODE)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	$(BYTECODE)
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# Headless Chromium for the HTML report tests (Debian package; needs root, as on CI).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium not found; the browser tests will be skipped"; fi; }

# The whole path on the offline defaults, in $(DEMO)/ (its saevctl.toml records the mined index and SAE). The steps
# are declared once, in tools/demo.py (README's transcript is regenerated from them: tools/demo.py --readme); each
# skips when its inputs are unchanged, so a second `make demo` takes seconds.
SAEVCTL := $(abspath $(BIN))/saevctl
demo: $(STAMP)
	$(BIN)/python tools/demo.py --workspace $(DEMO) --saevctl $(SAEVCTL)

# Lint and type checks (configured in pyproject.toml); `make test` runs them before the tests.
lint: $(TEST_STAMP)
	$(BIN)/ruff check saevctl tests benchmarks tools && $(BIN)/mypy

test: $(TEST_STAMP) system-deps lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py --quick

clean:
	rm -rf $(DEMO)
