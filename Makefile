# make setup  - idempotent: Debian packages (as root, if missing), .venv, pinned installs
# make demo   - setup, then a local cluster runs one job through every stage
# make test   - setup, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TEST_DEB_PACKAGES := chromium  # the dashboard's browser test (Playwright)
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# Install the Debian packages in $(1) that are missing (as root; otherwise warn): the test
# suite's own (the runtime's are deploy/install.sh's).
define deb_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages (run as root to install): $$missing"; fi; \
	fi
endef

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt deploy/install.sh common/ring/_atomics.c common/transfer/_checksum.c
	VENV=$(VENV) PYTHON=$(PYTHON) deploy/install.sh   # the images run the same script
	touch $(STAMP)

demo: setup
	$(VENV)/bin/stagepool demo --config configs/tiny.toml --state-dir .stagepool/demo

test: setup
	$(call deb_install,$(TEST_DEB_PACKAGES))
	@# docs/wire.md's Node example: any node and npm will do (Debian's, when there are none)
	@command -v npm >/dev/null 2>&1 || { echo "installing Debian's nodejs and npm"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/ring.py --json
	$(PY) bench/transfer.py --json
	$(PY) bench/gateway.py --json
	$(PY) bench/peers.py --json

clean:
	rm -rf $(VENV) .stagepool build *.egg-info common/ring/*.so common/transfer/*.so
