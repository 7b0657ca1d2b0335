# `make demo`: set up what is missing, then run the embedded default (sweeps/demo.py).
# `make test`: set up what is missing, then run the test suite.
PYTHON ?= python

.PHONY: help setup setup-demo demo test
# everything: the harness with its `all` and test extras and every upstream (DomainBed, Dassl, CoOp, tllib, MaPLe, PromptSRC)
setup:
	$(PYTHON) third_party/install.py --harness --extras test

# what the demo needs: the harness (core requirements only) and DomainBed
setup-demo:
	$(PYTHON) third_party/install.py --harness --only DomainBed

# the embedded default on generated data, on a CPU (docs/demo.md), after setup-demo
demo: setup-demo
	$(PYTHON) -m sweeps.demo

# the test suite, after setup
test: setup
	$(PYTHON) -m pytest -q -rs -n auto --dist loadfile --no-loadscope-reorder tests

# this list: each target with the comment line above it
help:
	@awk '/^# / {doc = substr($$0, 3); next} /^[a-z][a-z-]*:/ {split($$0, t, ":"); printf "  make %-11s %s\n", t[1], doc} {doc = ""}' $(firstword $(MAKEFILE_LIST))
