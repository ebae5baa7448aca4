# The two set-up commands of the README:
#   make demo   install everything into .venv and run the main job
#   make test   install what is missing and run the whole test suite (+ ruff, mypy on proto/ and device/,
#               and a 110-seed deterministic simulation sweep over every scenario)
.PHONY: demo test venv lint bench clean sweep-nightly nightly

VENV := .venv
PY := $(VENV)/bin/python

venv:
	@scripts/bootstrap.sh

demo: venv
	$(VENV)/bin/syncnode selfcheck
	$(VENV)/bin/syncdevice selfcheck
	$(PY) scripts/demo.py

lint: venv
	$(VENV)/bin/ruff check proto syncnode device simulations scripts tests
	$(VENV)/bin/mypy proto device

test: lint
	$(PY) -m pytest -q
	$(PY) -m simulations sweep --seeds 0..109 --steps 60

# The nightly sweep: ten times the seeds, longer runs.
sweep-nightly: venv
	$(PY) -m simulations sweep --seeds 0..999 --steps 120

# Nightly: the exhaustive 3-round Paxos model check (the default suite explores 2 rounds), then
# the long sweep. Both exit non-zero on any violation.
nightly: venv
	$(PY) -m simulations.paxos_explorer --require-complete
	$(PY) -m simulations.lease_explorer --rounds 2 --require-complete
	$(MAKE) sweep-nightly

bench: venv
	$(PY) scripts/bench_transport.py
	$(PY) scripts/bench_syncnode.py
	$(PY) scripts/bench_e2e.py
	$(PY) scripts/bench_join.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
