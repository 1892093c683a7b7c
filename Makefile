# nfrewrite — every target installs what it needs itself (fresh Debian 12, root).
# A second run is fast: apt is skipped when the packages are present, the venv
# is rebuilt only when pyproject.toml changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := build-essential libnetfilter-queue-dev pkg-config iptables nftables ethtool \
                iproute2 tshark tcpdump iperf3 curl procps kmod systemd
PYTEST_ARGS ?=

.PHONY: test demo bench fuzz soak lint install deps venv clean

deps: .stamp-apt venv

.stamp-apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .stamp-apt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $@

test: deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: deps
	$(BIN)/ruff check nfrewrite tests bench
	$(BIN)/mypy

bench: deps
	$(BIN)/python -m bench.run

fuzz: deps
	$(BIN)/python -m tests.fuzz

soak: deps
	$(BIN)/python -m tests.soak

clean:
	rm -rf $(VENV) .stamp-* build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
