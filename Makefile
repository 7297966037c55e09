# Two entry points: `make demo` (the main job on the built-in synthetic data) and `make test`.
# Each creates .venv and installs what it needs when missing; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: demo test clean model bundle

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

# The Flickr8k models (`make model`): a frozen EfficientNet encoder + soft attention, trained on 2 CPU cores in
# three stages; each training stage resumes from its last.pt when a killed `make model` is run again.
DATA ?= ../shared/flickr8k
ENCODER ?= efficientnet-lite1
RUNS := runs/flickr8k-$(ENCODER:efficientnet-%=%)
SCST_EPOCHS ?= 6
TRAIN := $(BIN)/caption-train --threads 1 --patience 2
CE := $(TRAIN) --data $(DATA) --encoder $(ENCODER) --decoder attention --cache-dir runs/cache \
	--embed-dim 512 --hidden-dim 512 --attention-dim 512 --lr 4e-4 --batch-size 64 --epochs 6
SCST := $(TRAIN) --objective scst --init $(RUNS)/ce/best.pt --epochs $(SCST_EPOCHS) --cache-dir runs/cache
EXPORT := $(BIN)/export-onnx --int8 --keep-fp32 encoder --force
# $(call stage,NAME,COMMAND): the training run $(RUNS)/NAME, resumed from its last.pt when there is one
stage = if [ -f $(RUNS)/$(1)/last.pt ]; then $(BIN)/caption-train --resume $(RUNS)/$(1)/last.pt; \
	else $(2) --output $(RUNS)/$(1); fi

model: $(STAMP)
	@echo "make model: 1/3 feature cache and cross-entropy training -> $(RUNS)/ce"
	$(call stage,ce,$(CE))
	@echo "make model: 2/3 self-critical training from $(RUNS)/ce/best.pt -> $(RUNS)/scst"
	$(call stage,scst,$(SCST))
	@echo "make model: 3/3 export -> $(RUNS)/ce/model and $(RUNS)/scst/model"
	$(EXPORT) $(RUNS)/ce/best.pt -o $(RUNS)/ce/model
	$(EXPORT) $(RUNS)/scst/best.pt -o $(RUNS)/scst/model
	@echo "make model: evaluate both (caption-eval), then bundle the better one: make bundle FROM=$(RUNS)/ce/best.pt"

# The bundled model: Lite1 + attention after cross-entropy training (the best beam-3 CIDEr-D measured within the
# latency budget; self-critical training lowered it, see the README), written as package data (int8 decoder,
# fp32 encoder, no fp32 graphs)
BUNDLED := edgecap/models/flickr8k-lite1
FROM ?= runs/flickr8k-lite1/ce/best.pt
bundle: $(STAMP)
	$(EXPORT) $(FROM) -o $(BUNDLED) --drop-fp32
