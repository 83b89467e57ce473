# Training: every target is one `python -m training.<stage>` command.
#   make train DATA=path/to/imagefolder [VAL=path/to/val] [RUN=runs/mine] [EPOCHS=10] [TRAIN_ARGS="--crop-size 128 ..."]
#   make export-run RUN=runs/mine [ARTIFACTS=artifacts/mine]   then   make engines ARTIFACTS=artifacts/mine
#   make prune RUN=runs/mine [PRUNE_ARGS="--target-flops-reduction 0.5 ..."]   then   make export-run RUN=runs/mine-pruned
#   make qat RUN=runs/mine [QAT_ARGS="--held-out D/val ..."]   then   make engines ARTIFACTS=artifacts/mine-qat PRECISION=int8 METHOD=qat
DATA ?= data/digits/train
VAL ?=
RUN ?= runs/train
EPOCHS ?= 10
TRAIN_ARGS ?=
EVAL_ARGS ?=
QAT_ARGS ?=
PRUNE_ARGS ?=

.PHONY: digits train train-demo export-run evaluate prune qat

digits: $(STAMP) ## write scikit-learn's handwritten digits as an ImageFolder in data/digits (offline)
	$(PY) -m common.digits data/digits

train: $(STAMP) ## fine-tune on DATA=<imagefolder> [VAL=<dir>] into RUN=runs/<name> (TRAIN_ARGS for the rest)
	$(PY) -m training.train --data-dir $(DATA) $(if $(VAL),--val-dir $(VAL)) --epochs $(EPOCHS) \
	    --output-dir $(RUN) $(TRAIN_ARGS)

train-demo: $(STAMP) ## digits -> fine-tune Lite0 on CPU -> ONNX -> repository -> real server on free ports; fails below 95% top-1
	$(PY) -m training.demo --data-root data/digits --run-dir runs/digits --artifacts artifacts/digits \
	    --repository runs/digits/model_repository

export-run: $(STAMP) ## export RUN=runs/<name> (its best.pt) to artifacts/<name> (or ARTIFACTS=...) with its labels
	$(PY) -m training.export --checkpoint $(RUN) $(if $(filter command line,$(origin ARTIFACTS)),--output-dir $(ARTIFACTS))

evaluate: $(STAMP) ## top-1/5, per-class report, confusion matrix PNG, misclassified.csv for RUN (EVAL_ARGS: --data-dir ...)
	$(PY) -m training.evaluate --checkpoint $(RUN) $(EVAL_ARGS)

prune: $(STAMP) ## channel-prune RUN (default: half the FLOPs) and fine-tune into RUN-pruned (PRUNE_ARGS: --ratio, --criterion ...)
	$(PY) -m training.prune --checkpoint $(RUN) $(PRUNE_ARGS)

qat: $(STAMP) ## quantization-aware fine-tuning of RUN into RUN-qat: export, qat cache, INT8 files, gate before/after (QAT_ARGS)
	$(PY) -m training.qat --checkpoint $(RUN) $(QAT_ARGS)
