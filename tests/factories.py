"""Factories the test modules share: run directories as each stage leaves them, recipe launchers and common
settings, so no test module imports another (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from finetune.config import (
    AdapterConfig,
    RewardRunConfig,
    SFTRunConfig,
    to_dict,
)
from finetune.models import load_tokenizer, lora_config, resolve_model
from finetune.runs import write_config
from finetune.templates import render, save_with_template

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _fit(model, tokenizer, template, conversations, steps: int = 60) -> None:
    rows = [render(template, conv, tokenizer) for conv in conversations]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)  # 1e-2 diverged on the 12-epoch base (greedy '8888...')
    model.train()
    for _ in range(steps):
        for ids, labels in rows:
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()



def make_run_dir(path: Path, template: str = "llama3", method: str = "lora", seed: int = 0, train_on=None) -> Path:
    """A run directory as SFT writes it, on the tiny base.

    ``method`` lora/qlora: a LoRA adapter with random B (qlora only differs in config.yaml: the export must then load
    the base unquantised). ``full``: the whole model, its last layer's MLP perturbed. ``train_on``: conversations the
    adapter is fitted to (a few dozen Adam steps), so greedy chat answers them and ends on the stop token.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"), dtype=torch.float32)
    adapter = AdapterConfig(method=method)
    if method == "full":
        with torch.no_grad():
            weight = model.model.layers[-1].mlp.down_proj.weight
            weight.add_(0.02 * torch.randn_like(weight))
    else:
        model = get_peft_model(model, lora_config(adapter))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
    if train_on:
        _fit(model, tokenizer, template, train_on)
    model.save_pretrained(path)
    save_with_template(tokenizer, template, path, model_config=model.config)
    cfg = SFTRunConfig(adapter=adapter, output_dir=str(path))
    cfg.data.template = template
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


PROMPTS = [
    "Question: What is 12 plus 30?\nAnswer:",
    "Reverse the words: pen hammer nest",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName the capital city of Cuba.<|eot_id|>",
]


def make_full_sft_run(directory, noise: float):
    """What recipes/sft.py leaves after full fine-tuning: the whole model (the tiny base, layer 0 moved by ``noise``),
    the tokenizer and config.yaml."""
    from transformers import AutoModelForCausalLM

    from finetune.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.model.layers[0].parameters():
            param.add_(torch.randn_like(param) * noise)
    model.save_pretrained(directory)
    load_tokenizer("tiny").save_pretrained(directory)
    write_config(directory, SFTRunConfig(output_dir=str(directory)))
    return directory


def make_sft_run(directory, seed=0, scale=0.05):
    """Save what recipes/sft.py leaves for DPO to start from: config.yaml and a LoRA adapter whose B is non-zero
    (a fresh adapter has B = 0 and would equal the base, which would hide a reference taken from the raw base)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    model = get_peft_model(base, lora_config(AdapterConfig(r=8, alpha=16)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    model.save_pretrained(directory)
    write_config(directory, SFTRunConfig(output_dir=str(directory)))
    return directory


def launch_recipe(recipe: str, processes: int, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``accelerate launch recipes/RECIPE ARGS`` with 1 process, or N CPU processes under cpu_ddp.yaml (DDP, gloo) on
    a free port; tests/ is on the path (the test scorers live there). An absolute RECIPE path runs that script."""
    if processes == 1:
        launcher = [str(ACCELERATE), "launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launcher = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
                    "--num_processes", str(processes), "--main_process_port", str(free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*launcher, str(ROOT / "recipes" / recipe), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Sampling over the whole distribution (the tuned default is the top 3), so the stand-in verifiers see varied answers.
QUICK = ["--data.max_train_samples=16", "--data.max_eval_samples=8", "--eval.num_samples=8",
         "--sampling.num_samples=2", "--sampling.max_new_tokens=12", "--sampling.top_k=0", "--ppo.rollout_batch_size=4",
         "--ppo.mini_batch_size=4", "--ppo.ppo_epochs=2", "--ppo.learning_rate=5e-3"]


_PIPELINE_EVAL = "--data.max_eval_samples=4, --eval.num_samples=4, --eval.max_new_tokens=8, --eval.before_training=false"
PIPELINE_QUICK = [
    f"--sft.overrides=[--train.max_steps=2, --data.max_train_samples=16, {_PIPELINE_EVAL}]",
    "--rejection_sampling.overrides=[--data.train=bundled:suite_messages_train.jsonl, --data.max_train_samples=6, "
    "--sampling.num_samples=4, --sampling.max_new_tokens=10, --sampling.temperature=1.0, --sampling.top_k=0, "
    "--score.verifier=toy_verifiers:negative_length, --rejection.keep_unverified=true, --train.max_steps=2, "
    f"{_PIPELINE_EVAL}]",
    "--dpo.overrides=[--train.max_steps=4, --train.per_device_batch_size=2, --train.logging_steps=1, "
    "--train.save_steps=2, --train.save_total_limit=10, --train.warmup_ratio=0, --adapter.dropout=0, "
    f"--dpo.rejected_to_first_difference=true, {_PIPELINE_EVAL}]",  # as pipeline.yaml ships it
    "--gate.metric=eval_loss", "--gate.max_samples=6", "--gate.max_new_tokens=8",
]
"""The rounds pipeline on a reduced budget (tiny model, a few steps per stage): recipes/pipeline.py's arguments."""


def make_reward_run(directory, seed=1, scale=0.05):
    """What recipes/reward.py leaves: config.yaml, the tokenizer, and a SEQ_CLS LoRA adapter saved with its scalar
    ``score`` head, here random (non-zero B and head) so that scores differ between conversations."""
    from peft import get_peft_model

    from finetune.models import load_sequence_classifier
    from finetune.stages.reward import reward_lora_config

    cfg = RewardRunConfig(output_dir=str(directory), adapter=AdapterConfig(r=4, alpha=8))
    torch.manual_seed(seed)
    model = get_peft_model(load_sequence_classifier(cfg.model, "lora", for_training=False), reward_lora_config(cfg.adapter))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0.0, scale if "lora_B" in name else 1.0)
    model.save_pretrained(directory)
    tokenizer = load_tokenizer("tiny")
    save_with_template(tokenizer, "llama3", directory)
    write_config(directory, cfg)
    return directory


def bare_copy(source, tmp_path):
    """``source`` alone in a fresh directory, as Meta's downloads hold it."""
    directory = tmp_path / source.parent.name
    directory.mkdir()
    shutil.copy(source, directory / "tokenizer.model")
    return directory


def reference_cases(real_artifacts, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's ``ggml-vocab-NAME.gguf.inp``/``.out``: texts split by ``__ggml_vocab_test__`` lines, one line of
    ids per text (tokenised without BOS)."""
    base = real_artifacts / "llama.cpp" / f"ggml-vocab-{name}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    lines = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(texts) == len(lines) == 46
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def logits_of(model, tokenizer, prompts=PROMPTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer.encode(p, add_special_tokens=False)])).logits[0].float() for p in prompts]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
