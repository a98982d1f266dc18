# wiretun: `sudo make demo` runs the main job, `sudo make test` the tests. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the tests, demo and benchmarks use (installed only when a command is missing).
APT_PACKAGES := iproute2 iputils-ping wireguard-go wireguard-tools iperf3 tcpdump tshark ethtool gcc libc6-dev python3-venv python3-dev libssl-dev procps iptables
APT_COMMANDS := ip ping wg wg-quick wireguard-go iperf3 tcpdump tshark ethtool gcc pgrep iptables

.PHONY: all deps venv demo demo-wireguard-go demo-example lint test test-unit soak bench fuzz clean

all: venv

deps:
	@missing=""; for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	$(PYTHON) -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		|| missing="$$missing python3-dev"; \
	[ -e /usr/include/openssl/evp.h ] || missing="$$missing libssl-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

$(BIN)/.installed: pyproject.toml setup.py src/wiretun/_speedups.c src/wiretun/wireguard/_wgcrypto.c | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	bash demo/wireguard.sh

demo-wireguard-go: venv
	bash demo/wireguard.sh wireguard-go

demo-example: venv
	$(BIN)/python demo/example_in_netns.py

# Static checks (versions pinned in pyproject's test extra, rules in [tool.mypy] and [tool.ruff]). The
# Windows backend is checked a second time as on Windows (its Windows-only ctypes names included).
lint: venv
	@status=0; \
	$(BIN)/python -m mypy || status=1; \
	$(BIN)/python -m mypy --platform win32 src/wiretun/windows || status=1; \
	$(BIN)/python -m ruff check src tests bench demo fuzz || status=1; \
	exit $$status

# pytest exits 5 when it collected nothing; that is a failure here, never a silent pass.
# make lint runs first: a type or lint finding fails the run before minutes of system tests.
# Then the session system tests again on the pure-Python loops that machines without a compiler run
# (WIRETUN_NO_SPEEDUPS=1: every receive and send loop, plain and offload; about 30 s).
test: venv lint
	$(BIN)/python -m pytest -q -rs tests
	WIRETUN_NO_SPEEDUPS=1 $(BIN)/python -m pytest -q -rs tests/system/test_session.py \
		tests/system/test_session_rules.py tests/system/test_throughput.py

test-unit: venv
	$(BIN)/python -m pytest -q tests/unit

# Minutes of UDP, handshake and UAPI fuzzing of wiretun-wg and of library fuzzing (C and pure Python), in
# namespaces it makes; prints what it sent and found, fails on any defect. `make test` runs the quick form.
fuzz: venv
	$(BIN)/python fuzz/run.py

# The long WireGuard runs: 1 GB each way per case through ~34 KB-MTU tunnels (TCP and iperf3 -u -b 0,
# outer IPv4 and IPv6, wiretun-wg and wireguard-go); prints the counters. `make test` moves 24 MB a case.
soak: venv
	WIRETUN_WG_BYTES=1G $(BIN)/python -m pytest -q -rs -s tests/system/test_wg_bigmtu.py

bench: venv
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
