# Two entry points: `make demo` (the main job on the built-in synthetic data) and `make test`.
# Each creates .venv and installs what it needs when missing; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: demo test clean model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m edgecap.demo --output $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache

# The shipped Flickr8k model: frozen EfficientNet-Lite0 + both decoders, trained on 2 CPU cores (`make model`).
DATA ?= ../shared/flickr8k
RUNS := runs/flickr8k-lite0
BUNDLED := edgecap/models/flickr8k-lite0
TRAIN_REAL := $(BIN)/caption-train --data $(DATA) --encoder efficientnet-lite0 --threads 1 \
	--embed-dim 512 --hidden-dim 512 --attention-dim 512 --lr 4e-4 --batch-size 64 --epochs 6 --patience 2 \
	--cache-dir $(RUNS)/cache

# each training run resumes from its last.pt when a killed `make model` is run again
model: $(STAMP)
	if [ -f $(RUNS)/attention/last.pt ]; then $(BIN)/caption-train --resume $(RUNS)/attention/last.pt; \
	else $(TRAIN_REAL) --decoder attention --output $(RUNS)/attention; fi
	if [ -f $(RUNS)/plain/last.pt ]; then $(BIN)/caption-train --resume $(RUNS)/plain/last.pt; \
	else $(TRAIN_REAL) --decoder plain --output $(RUNS)/plain; fi
	$(BIN)/export-onnx $(RUNS)/attention/best.pt -o $(RUNS)/attention/model --int8 --keep-fp32 encoder --force
	$(BIN)/export-onnx $(RUNS)/plain/best.pt -o $(RUNS)/plain/model --int8 --keep-fp32 encoder --force
	$(BIN)/export-onnx $(RUNS)/attention/best.pt -o $(BUNDLED) --int8 --keep-fp32 encoder --drop-fp32 --force
