# `make demo`: set up what is missing, then run the embedded default (sweeps/demo.py).
# `make test`: set up what is missing, then run the test suite.
PYTHON ?= python

.PHONY: setup demo test
setup:
	$(PYTHON) third_party/install.py --harness

demo: setup
	$(PYTHON) -m sweeps.demo

test: setup
	$(PYTHON) -m pytest -q -rs tests
