# mmsearch: `make demo` runs the embedded default end to end, `make test` runs the tests.
# Both create .venv (and install the project into it) when it is missing or out of date.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
SEED ?= 0

.PHONY: install demo app test test-all bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The tests also run DeepSpeed ZeRO on the CPU (2 gloo ranks); its sdist builds against the installed torch.
$(BIN)/.deepspeed: $(BIN)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed==0.19.8"
	touch $@

# world -> CLIP -> indexes -> a few tool calls -> tiny policy -> dataset (gold trajectories) -> copy stage -> SFT -> ask + eval
# -> RL -> eval -> the before/after table, all offline.
# A rerun reuses the finished copy, SFT and RL runs in $(RUN)/copy, $(RUN)/sft and $(RUN)/rl (--resume); delete them to train again.
demo: install
	$(BIN)/mmsearch world build --config configs/world/default.yaml --out $(RUN)/world --seed $(SEED)
	$(BIN)/mmsearch clip train --config configs/clip/tiny.yaml --kb $(RUN)/world --out $(RUN)/clip
	$(BIN)/mmsearch index build --config configs/index/default.yaml --kb $(RUN)/world --out $(RUN)/index image_encoder.name=$(RUN)/clip
	$(BIN)/mmsearch demo tools --kb $(RUN)/world --index $(RUN)/index
	$(BIN)/mmsearch model init-tiny --config configs/model/tiny.yaml --kb $(RUN)/world --out $(RUN)/policy
	$(BIN)/mmsearch synth --config configs/synth/default.yaml --kb $(RUN)/world --index $(RUN)/index --out $(RUN)/dataset \
		--n 4000 --seed $(SEED) --processor $(RUN)/policy --push-format sharegpt
	sed -n '/^## Splits/,/^## How it was made/p;/^## Histograms/,$$p' $(RUN)/dataset/card.md
	$(BIN)/mmsearch sft --config configs/sft/copy.yaml --model $(RUN)/policy --out $(RUN)/copy --resume
	$(BIN)/mmsearch sft --config configs/sft/tiny.yaml --model $(RUN)/copy/final --data $(RUN)/dataset --index $(RUN)/index \
		--out $(RUN)/sft --resume
	$(BIN)/mmsearch ask --model $(RUN)/sft/final --index $(RUN)/index --image $(RUN)/world/scenes/scene_000000.png \
		"What is the capital of the nation whose flag is at the top left?" --out $(RUN)/ask
	$(BIN)/mmsearch eval --config configs/eval/default.yaml --model $(RUN)/sft/final --data $(RUN)/dataset --split test \
		--index $(RUN)/index --out $(RUN)/eval
	$(BIN)/mmsearch rl --config configs/rl/tiny.yaml --model $(RUN)/sft/final --data $(RUN)/dataset --index $(RUN)/index \
		--out $(RUN)/rl --resume eval.enabled=false
	$(BIN)/mmsearch eval --config configs/eval/default.yaml --model $(RUN)/rl/final --data $(RUN)/dataset --split test \
		--index $(RUN)/index --out $(RUN)/eval_rl
	$(BIN)/mmsearch compare $(RUN)/eval $(RUN)/eval_rl --labels "SFT,SFT + RL"

# The web page (Gradio, loopback) over a demo policy and its indexes, after `make demo`: Ask and Browse tabs.
APP_MODEL ?= $(RUN)/sft/final
app: install
	$(BIN)/mmsearch app --model $(APP_MODEL) --index $(RUN)/index

# Fast suite (what CI runs); `make test-all` adds the slow tests.
test: install $(BIN)/.deepspeed
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: install $(BIN)/.deepspeed
	$(BIN)/python -m pytest -q -m "not gpu"

bench: install
	$(BIN)/python benchmarks/run_all.py --out bench_out

clean:
	rm -rf runs bench_out
