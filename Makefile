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

# The shipped Flickr8k model (`make model`): a frozen EfficientNet encoder + soft attention, trained on 2 CPU cores
# in three stages; each training stage resumes from its last.pt when a killed `make model` is run again.
DATA ?= ../shared/flickr8k
ENCODER ?= efficientnet-lite0
RUNS := runs/flickr8k-$(ENCODER:efficientnet-%=%)
BUNDLED := edgecap/models/flickr8k-lite0
SCST_EPOCHS ?= 6
TRAIN := $(BIN)/caption-train --threads 1 --patience 2
CE := $(TRAIN) --data $(DATA) --encoder $(ENCODER) --decoder attention --cache-dir runs/cache \
	--embed-dim 512 --hidden-dim 512 --attention-dim 512 --lr 4e-4 --batch-size 64 --epochs 6
SCST := $(TRAIN) --objective scst --init $(RUNS)/ce/best.pt --epochs $(SCST_EPOCHS) --cache-dir runs/cache
# $(call stage,NAME,COMMAND): the training run $(RUNS)/NAME, resumed from its last.pt when there is one
stage = if [ -f $(RUNS)/$(1)/last.pt ]; then $(BIN)/caption-train --resume $(RUNS)/$(1)/last.pt; \
	else $(2) --output $(RUNS)/$(1); fi

model: $(STAMP)
	@echo "make model: 1/3 feature cache and cross-entropy training -> $(RUNS)/ce"
	$(call stage,ce,$(CE))
	@echo "make model: 2/3 self-critical training from $(RUNS)/ce/best.pt -> $(RUNS)/scst"
	$(call stage,scst,$(SCST))
	@echo "make model: 3/3 export -> $(RUNS)/scst/model and $(BUNDLED)"
	$(BIN)/export-onnx $(RUNS)/scst/best.pt -o $(RUNS)/scst/model --int8 --keep-fp32 encoder --force
	$(BIN)/export-onnx $(RUNS)/scst/best.pt -o $(BUNDLED) --int8 --keep-fp32 encoder --drop-fp32 --force
