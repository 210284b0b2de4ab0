"""Our GGUF files in llama.cpp itself (skipped unless llama-cpp-python is installed: it is no dependency, and builds
from source in about 8 minutes with ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python``).

Token ids on llama.cpp's own reference tokenisations for every vocabulary the writer handles, logits of an exported
tiny run within float32 noise of the merged model, and greedy chat generation that ends on the template's stop
token. ``benchmarks/gguf_llamacpp_parity.py`` does the same at full size (SmolLM2-135M-Instruct) and records figures.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from factories import CONVERSATION, PROMPTS, make_run_dir  # noqa: E402

from finetune.export import GGUF_FILE, export  # noqa: E402
from finetune.models import load_tokenizer  # noqa: E402
from finetune.templates import get_template  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("gguf_llamacpp_parity", BENCHMARKS / "gguf_llamacpp_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_llama_cpp_tokenises_every_vocabulary_like_the_reference(parity, real_artifacts, tmp_path):
    rows = [parity.token_parity(case, tmp_path) for case in parity.tokenizer_cases(real_artifacts, tmp_path)]
    assert [(row["vocabulary"], row["llama_cpp_equal"]) for row in rows] == [(row["vocabulary"], 46) for row in rows]


def test_tiny_run_in_llama_cpp_logits_and_stop_token(parity, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer("tiny")
    run = make_run_dir(tmp_path / "sft", seed=5, train_on=[CONVERSATION])
    merged = AutoModelForCausalLM.from_pretrained(export(run, "merged", tmp_path / "merged", dtype="float32")).eval()
    gguf_path = export(run, "gguf", tmp_path / "gguf", dtype="f32") / GGUF_FILE
    result = parity.logits_parity(merged, tokenizer, gguf_path, PROMPTS, f32_kv_cache=True)
    assert result["relative"] < 1e-4 and result["top1_agreement"] == 1.0, result

    template = get_template("llama3", tokenizer)
    ids = tokenizer.encode(template.text(CONVERSATION[:2], add_generation_prompt=True), add_special_tokens=False)
    llm = parity.llama_cpp_model(gguf_path, n_ctx=256, type_k=0, type_v=0)
    try:
        out = llm.create_completion(ids, max_tokens=16, temperature=0.0, top_k=1)
    finally:
        llm.close()
    with torch.no_grad():
        generated = merged.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    eos_token_id=tokenizer.convert_tokens_to_ids(["<|eot_id|>"]))[0, len(ids):]
    assert out["choices"][0]["finish_reason"] == "stop"  # ended on <|eot_id|>, the GGUF's EOS/EOT
    assert tokenizer.decode(generated[-1:]) == "<|eot_id|>"
    assert out["choices"][0]["text"] == tokenizer.decode(generated[:-1]) == CONVERSATION[2]["content"]
