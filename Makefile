# edgefleet: two commands, `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export TF_CPP_MIN_LOG_LEVEL := 3
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install system-deps arm64-deps test test-slow test-cluster test-arm64 demo lint bench protos protos-check dist clean

install: $(STAMP)

$(STAMP): pyproject.toml packaging/agent/pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade "pip>=24" wheel
	@# compat: the repository root on sys.path, so edgefleet/ (links to the parts) imports as it is;
	@# the two distributions share the edgefleet namespace (packaging/agent is edgefleet-agent)
	$(PYTHON) -m pip install -q -c constraints.txt --config-settings editable_mode=compat -e packaging/agent -e ".[all]"
	$(PYTHON) -m pip check
	touch $(STAMP)

# mosquitto and PostgreSQL are what the tests and the demo start on loopback; iproute2's
# `ip netns` makes the other hosts of tests/e2e/test_identity.py; systemd-analyze checks the
# agent's service unit.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v xdelta3 >/dev/null || missing="$$missing xdelta3"; \
	command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing="$$missing iproute2"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing="$$missing nats-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing (install them with your package manager)" >&2; exit 1; \
	  fi; \
	fi

test: install
	$(BIN)/pytest -m "not slow" -q

test-slow: install
	$(BIN)/pytest -m slow -q

# The slow failover and clustered-broker tests (marker `cluster`, a subset of test-slow) that
# CI runs after `make test`: coordinator replicas on a 3-node NATS cluster with the leader
# (or the NATS node under it) SIGKILLed mid-canary, the SIGSTOPped leader on Mosquitto, a
# NATS node SIGKILLed mid-download, an agent release stopped at the canary. Timing: README.md.
test-cluster: install
	$(BIN)/pytest -m cluster -q --durations=0 --durations-min=5

# The agent-only wheel on Debian arm64 under qemu-user-static (tests/e2e/test_aarch64.py,
# docs/agent.md): needs root for binfmt_misc, chroot and mounts. The debootstrapped root
# filesystem and pip's downloads are cached in $EDGEFLEET_CACHE (default ~/.cache/edgefleet).
test-arm64: install arm64-deps
	$(BIN)/pytest -m slow -q -rs tests/e2e/test_aarch64.py

# Debian packages for test-arm64 only (not part of system-deps: ~60 MB, only that test uses them)
arm64-deps:
	@missing=""; \
	command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v qemu-aarch64-static >/dev/null || missing="$$missing qemu-user-static"; \
	command -v update-binfmts >/dev/null || [ -x /usr/sbin/update-binfmts ] || missing="$$missing binfmt-support"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing (install them with your package manager)" >&2; exit 1; \
	  fi; \
	fi

demo: install
	$(PYTHON) -m edgefleet.simulator.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check edgefleet/__init__.py cloud agent models simulator protos/*.py tests bench
	$(BIN)/mypy

bench: install
	$(PYTHON) -m bench

PROTOS := $(wildcard edgefleet/protos/fleet/v1/*.proto)
protos: install
	PATH="$(abspath $(BIN)):$$PATH" $(PYTHON) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	@# grpc stubs for files without services are empty: keep only real ones
	@for f in protos/fleet/v1/*_pb2_grpc.py; do grep -q "class .*Stub" $$f || rm -f $$f; done
	@for f in protos/fleet/v1/*_pb2_grpc.pyi; do grep -q "class .*Stub" $$f || rm -f $$f; done

protos-check: protos
	git diff --exit-code -- protos || { echo "generated protobuf code is stale: run 'make protos' and commit" >&2; exit 1; }
	test -z "$$(git status --porcelain -- protos)" || { git status --porcelain -- protos; echo "untracked generated files: run 'make protos' and commit" >&2; exit 1; }

# the two wheels: edgefleet-agent (devices) and edgefleet (coordinator, CLI, simulator)
dist: install
	rm -rf dist && $(PYTHON) -m pip wheel -q --no-deps --no-build-isolation -w dist ./packaging/agent .
	@ls -l dist

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo .bench dist build packaging/agent/build
