# The two commands a user needs: `make demo` and `make test`. Everything else is plumbing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXT_SRC := $(wildcard edgevirt/backend/virtq/*.c edgevirt/backend/virtq/*.h)
HOST_STAMP := $(VENV)/.host-packages
PY_STAMP := $(VENV)/.installed

.PHONY: demo test setup setup-test lint bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install what is missing, build kernel+image, boot QEMU virt, run the smoke suite"
	@echo "make test   - install what is missing (plus test tools), run the whole test suite"
	@echo "make lint   - ruff and mypy on the package"
	@echo "make bench  - back-end benchmarks (bench/)"

$(HOST_STAMP): scripts/setup-host.sh
	./scripts/setup-host.sh
	@mkdir -p $(VENV) && touch $@

$(PY): | $(HOST_STAMP)
	python3 -m venv $(VENV)

$(PY_STAMP): $(PY) $(HOST_STAMP) pyproject.toml setup.py $(EXT_SRC)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[test]'
	$(PY) setup.py -q build_ext --inplace
	@touch $@

setup: $(HOST_STAMP) $(PY_STAMP)

demo: setup
	$(VENV)/bin/edgevirt up

test: setup
	@$(VENV)/bin/pytest -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check edgevirt tests bench
	$(VENV)/bin/mypy edgevirt

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf build out *.egg-info edgevirt/backend/virtq/*.so
