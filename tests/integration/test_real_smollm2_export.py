"""End to end on real weights and real data: LoRA SFT of SmolLM2-135M-Instruct on real ShareGPT conversations,
then adapter, merged and GGUF export, the GGUF's logits read back equal to the merged model's.

SmolLM2-135M-Instruct is a LLaMA-architecture model (30 layers, GQA 9/3 heads, tied embeddings, byte-level BPE with
GPT-2's split); its Q4_1 GGUF is dequantised by transformers and saved once as a model directory, the base. The
GGUF is read back with transformers (``gguf_file=``), and with llama.cpp too where llama-cpp-python is installed.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from finetune.config import SFTRunConfig
from finetune.export import GGUF_FILE, METADATA_FILE, export
from finetune.models import load_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CONVERSATIONS = 4
PROMPTS = ["The capital of France is", "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]


def parity_module():
    """``benchmarks/gguf_llamacpp_parity.py`` (the SmolLM2 model directory and llama.cpp's logits come from it)."""
    spec = importlib.util.spec_from_file_location("gguf_llamacpp_parity", BENCHMARKS / "gguf_llamacpp_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def sharegpt_records(path: Path, wanted: int, max_chars: int = 600) -> tuple[list[dict], int]:
    """The first ``wanted`` records of a ShareGPT JSON array that alternate human/gpt from a human turn and are short,
    decoded one by one from the start (the file is 125 MB); returns them and how many were passed over."""
    decoder = json.JSONDecoder()
    text = path.read_text(encoding="utf-8")
    position = text.index("[") + 1
    kept, passed = [], 0
    while len(kept) < wanted:
        while text[position] in " \n\r\t,":
            position += 1
        record, position = decoder.raw_decode(text, position)
        turns = record.get("conversations") or []
        roles = [turn.get("from") for turn in turns]
        alternating = len(turns) >= 2 and len(turns) % 2 == 0 and roles == ["human", "gpt"] * (len(turns) // 2)
        short = sum(len(turn.get("value") or "") for turn in turns) <= max_chars
        if alternating and short and all((turn.get("value") or "").strip() for turn in turns):
            kept.append({"conversations": [{"from": t["from"], "value": t["value"]} for t in turns]})
        else:
            passed += 1
    return kept, passed


def logits(model, tokenizer, prompts=PROMPTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer.encode(p, add_special_tokens=False)])).logits[0].float() for p in prompts]


def test_lora_sft_on_sharegpt_then_adapter_merged_and_gguf(real_artifacts, tmp_path):
    import recipe_runs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    parity = parity_module()
    base = parity.smollm2_model_dir(real_artifacts, tmp_path)
    records, passed = sharegpt_records(real_artifacts / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.json",
                                       CONVERSATIONS)
    assert len(records) == CONVERSATIONS and passed > 0
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    run = tmp_path / "sft"
    status = recipe_runs.run_recipe("sft", SFTRunConfig, [
        "--output_dir", str(run), f"--model.name={base}", f"--data.train={data}", "--data.eval=null",
        "--data.template=chatml", "--data.max_length=256", "--train.max_steps=2", "--train.per_device_batch_size=2",
        "--train.learning_rate=1e-3", "--train.warmup_ratio=0", "--train.logging_steps=1", "--train.save_steps=100",
        "--eval.verifier=null", "--eval.before_training=false", "--adapter.r=8", "--adapter.alpha=16",
    ])
    assert status == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 2 and all(loss == loss and loss > 0 for loss in losses)

    tokenizer = load_tokenizer(str(base))
    adapter = export(run, "adapter", tmp_path / "adapter")
    merged = export(run, "merged", tmp_path / "merged", dtype="float32")
    gguf_dir = export(run, "gguf", tmp_path / "gguf", dtype="f32")

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_logits = logits(base_model, tokenizer)
    with_adapter = PeftModel.from_pretrained(base_model, adapter).eval()
    adapter_logits = logits(with_adapter, tokenizer)
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    merged_logits = logits(merged_model, tokenizer)
    trained = max((a - b).abs().max().item() for a, b in zip(adapter_logits, base_logits, strict=True))
    assert trained > 1e-3, "two LoRA steps must move the logits for the comparison below to mean much"
    scale = max(x.abs().max().item() for x in merged_logits)
    assert max((a - b).abs().max().item() for a, b in zip(merged_logits, adapter_logits, strict=True)) / scale < 1e-5

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    diff = max((a - b).abs().max().item() for a, b in zip(logits(gguf_model, tokenizer), merged_logits, strict=True))
    assert diff / scale < 1e-5, f"GGUF read back: max abs diff {diff:.3g} at logit scale {scale:.3g}"
    metadata = json.loads((gguf_dir / METADATA_FILE).read_text())
    assert metadata["template"] == "chatml" and metadata["stop_tokens"] == ["<|im_end|>"]

    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp itself, where it is installed
        result = parity.logits_parity(merged_model, tokenizer, gguf_dir / GGUF_FILE, PROMPTS, f32_kv_cache=True)
        assert result["relative"] < 1e-4 and result["top1_agreement"] == 1.0, result
