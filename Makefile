# The newcomer path: `make run` and `make test` need nothing but python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench matrix clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $(STAMP)

# Serve example_app on 127.0.0.1:8000 with every lifecycle event logged; Ctrl-C or TERM stops it.
run: $(STAMP)
	cp gunicorn.conf.py.example $(VENV)/gunicorn.conf.py
	exec $(BIN)/gunicorn -c $(VENV)/gunicorn.conf.py example_app.app:app

# Two processes: the suite waits on real servers more than it computes (about 7 minutes).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2

lint: $(STAMP)
	$(BIN)/mypy
	$(BIN)/ruff check gunicorn_lifecycle tests benchmarks example_app

# Benchmarks against bare Gunicorn and a naive tracker (not part of `make test`): ratios, budgets.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint,bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Every supported Gunicorn on every Python found here (pyenv's too); not part of CI.
matrix: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check nox
	$(BIN)/nox -f noxfile.py $(NOX_ARGS)

clean:
	rm -rf $(VENV) .nox *.egg-info .pytest_cache .mypy_cache .ruff_cache
