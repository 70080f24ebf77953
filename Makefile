# The two commands a user needs: `make demo` and `make test`. Everything else is plumbing.
# Installer output goes to $(LOG); each step prints one line.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EV := $(VENV)/bin/edgevirt
LOG := $(VENV)/install.log
EXT_SRC := $(wildcard edgevirt/backend/virtq/*.c edgevirt/backend/virtq/*.h edgevirt/backend/*.c)
PY_STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test setup setup-test host-demo host-test lint bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install what is missing, build kernel+image, boot QEMU virt, run the smoke suite"
	@echo "make test   - install what is missing (plus test tools), run the whole test suite"
	@echo "make lint   - ruff (lint + format check) and mypy"
	@echo "make bench  - back-end benchmarks (bench/)"

# Host packages: scripts/setup-host.sh installs only what is missing (fast when nothing is).
host-demo:
	@./scripts/setup-host.sh demo
host-test:
	@./scripts/setup-host.sh test

$(PY):
	@echo "setup: python venv $(VENV)"
	@python3 -m venv $(VENV)

$(PY_STAMP): $(PY) pyproject.toml setup.py $(EXT_SRC)
	@echo "setup: installing edgevirt into $(VENV) (log: $(LOG))"
	@{ $(PIP) install --upgrade pip setuptools wheel && $(PIP) install -e . && \
	   $(PY) setup.py build_ext --inplace; } >>$(LOG) 2>&1 || \
	 { tail -20 $(LOG); echo "setup: pip install failed (log: $(LOG))" >&2; exit 3; }
	@touch $@

$(TEST_STAMP): $(PY_STAMP)
	@echo "setup: installing the test tools (log: $(LOG))"
	@$(PIP) install -e '.[test]' >>$(LOG) 2>&1 || \
	 { tail -20 $(LOG); echo "setup: pip install failed (log: $(LOG))" >&2; exit 3; }
	@# The labgrid extra brings labgrid's fork pyserial-labgrid, which installs the same
	@# `serial` package as pyserial: whichever pip wrote last wins (labgrid #1245). Reinstall
	@# the fork last so the outcome never depends on pip's order: it is pyserial 3.5 plus
	@# labgrid's RFC2217 fixes (tests/test_lab.py checks it and RFC2217 through ser2net).
	@$(PIP) install --force-reinstall --no-deps 'pyserial-labgrid==3.5.0.2' >>$(LOG) 2>&1 || \
	 { tail -20 $(LOG); echo "setup: pip install failed (log: $(LOG))" >&2; exit 3; }
	@touch $@

setup: host-demo $(PY_STAMP)
	@$(EV) doctor --for demo >/dev/null || $(EV) doctor --for demo

setup-test: host-test $(TEST_STAMP)
	@$(EV) doctor --for test >/dev/null || $(EV) doctor --for test

demo: setup
	$(EV) up

# The kernel and images the suite needs are built once, first, with progress; the tests'
# own timeouts then cover what they test, never a cold build.
test: setup-test
	@echo "test: guest kernel (cached after the first build)"
	@$(EV) kernel build >/dev/null
	@echo "test: guest image and service-VM image"
	@$(EV) image build --board qemu-virt -o $(VENV)/warm-image >/dev/null || \
	  echo "test: guest image build failed; the tests that need it will say why" >&2
	@$(EV) servicevm image >/dev/null || \
	  echo "test: service-VM image build failed; the tests that need it will say why" >&2
	@$(PY) -m pytest -ra --durations=20; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup-test
	$(VENV)/bin/ruff check edgevirt tests bench fuzz
	$(VENV)/bin/ruff format --check edgevirt tests bench fuzz
	$(VENV)/bin/mypy edgevirt

bench: setup-test
	$(PY) bench/run.py

clean:
	rm -rf build out *.egg-info edgevirt/backend/virtq/*.so
