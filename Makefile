# nfrewrite — every target installs what it needs itself (fresh Debian 12, root).
# A second run is fast: apt is skipped when the packages are present, the venv
# is rebuilt only when pyproject.toml changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := build-essential libnetfilter-queue-dev pkg-config iptables nftables ethtool \
                iproute2 tshark tcpdump iperf3 curl procps kmod systemd prometheus
PYTEST_ARGS ?=

PREFIX ?= /usr/local
DESTDIR ?=
OPT := /opt/nfrewrite

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

demo: deps
	$(BIN)/python -m lab.demo

lint: deps
	$(BIN)/ruff check nfrewrite tests bench lab
	$(BIN)/mypy

bench: deps
	$(BIN)/python -m bench.run

fuzz: deps
	$(BIN)/python -m tests.fuzz

soak: deps
	$(BIN)/python -m tests.soak

# A self-contained venv in /opt/nfrewrite, the command on PATH, the unit, an example /etc/nfrewrite
# (never overwriting an existing config), and the service user. DESTDIR stages everything for a
# package build (the venv is then built for its final path and must not be moved elsewhere).
# build/ and *.egg-info are removed first: pip would install a stale build tree's files.
install: .stamp-apt
	rm -rf build *.egg-info
	$(PYTHON) -m venv $(DESTDIR)$(OPT)
	$(DESTDIR)$(OPT)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(OPT)/bin/pip install -q .
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/etc/systemd/system \
	  $(DESTDIR)/etc/nfrewrite/rules $(DESTDIR)$(PREFIX)/share/doc/nfrewrite
	ln -sf $(OPT)/bin/nfrewrite $(DESTDIR)$(PREFIX)/bin/nfrewrite
	install -m 0644 systemd/nfrewrite.service $(DESTDIR)/etc/systemd/system/nfrewrite.service
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/nfrewrite/README.md
	test -e $(DESTDIR)/etc/nfrewrite/nfrewrite.toml || \
	  install -m 0644 nfrewrite.toml $(DESTDIR)/etc/nfrewrite/nfrewrite.toml
	for f in rules/*.toml; do \
	  test -e $(DESTDIR)/etc/nfrewrite/$$f || install -m 0644 $$f $(DESTDIR)/etc/nfrewrite/$$f; \
	done
	chmod 0755 $(DESTDIR)/etc/nfrewrite $(DESTDIR)/etc/nfrewrite/rules
	if [ -z "$(DESTDIR)" ] && ! id nfrewrite >/dev/null 2>&1; then \
	  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nfrewrite; \
	fi
	if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null; then systemctl daemon-reload || true; fi

clean:
	rm -rf $(VENV) .stamp-* build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
