"""Our GGUF exports in llama.cpp itself: token ids, logits and where generation stops.

    python benchmarks/gguf_llamacpp_parity.py [--real .cache/real]     # needs llama-cpp-python (not a dependency)

llama-cpp-python is llama.cpp with Python bindings (``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python``
builds it from source, about 8 minutes on 2 cores). Every GGUF here is written by ``finetune.gguf_writer``, never by
llama.cpp's converter, and read by llama.cpp:

1. **Token ids.** For each vocabulary (Llama 2's SentencePiece, Llama 3's and GPT-2's byte-level BPE, as the
   tokenizers transformers builds; Mistral v0.1's SentencePiece ``tokenizer.model`` alone; the tiny model's), a
   GGUF with a one-layer LLaMA of that vocabulary size; llama.cpp tokenises llama.cpp's own reference texts
   (``models/ggml-vocab-*.gguf.inp``) with it, compared with the reference ids (``.out``, or sentencepiece / the
   tokenizer itself where llama.cpp has no reference for that vocabulary), and so is the transformers tokenizer.
2. **Logits.** SmolLM2-135M-Instruct (real LLaMA-architecture weights; the Q4_1 GGUF dequantised by transformers and
   saved as a model directory) exported by ``finetune export --to gguf`` in f32, f16 and q8_0: llama.cpp's logits on
   a few prompts against transformers' on the same ids (max abs difference relative to the largest logit, top-1
   agreement).
3. **Stop token.** Greedy generation from the f32 export in llama.cpp on chat prompts rendered with the ``chatml``
   template: it must end on the template's stop token ``<|im_end|>`` (the GGUF's EOS/EOT) before the token limit,
   with the same tokens as transformers' greedy ``generate`` stopping at the template's stop ids.

Results go to ``benchmarks/results/gguf_llamacpp_parity.json`` and a table (``.md`` beside it, and stdout).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SMOLLM2_GGUF = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, a llama named 🦙 walked 1,234 km to",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about llamas."}],
]
DTYPES = ("f32", "f16", "q8_0")


def reference_cases(real: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's ``ggml-vocab-NAME.gguf.inp``/``.out``: texts split by ``__ggml_vocab_test__`` lines, one line of
    ids per text (tokenised without BOS)."""
    base = real / "llama.cpp" / f"ggml-vocab-{name}.gguf"
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    lines = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def vocab_gguf(path: Path, tokenizer, sentencepiece_model=None) -> Path:
    """A GGUF of ``tokenizer`` with a one-layer random LLaMA of its vocabulary size (llama.cpp needs a model file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.gguf_writer import write_llama_gguf

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return write_llama_gguf(path, LlamaForCausalLM(config).eval(), tokenizer, dtype="f16", add_bos_token=False,
                            sentencepiece_model=sentencepiece_model)


def llama_cpp_model(path: Path, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(str(path), verbose=False, **kwargs)


def tokenizer_cases(real: Path, work: Path) -> list[dict]:
    """Every vocabulary: ``(name, tokenizer, sentencepiece file, cases)``, the cases' ids being the reference."""
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    from finetune.models import load_tokenizer

    spm_dir = work / "mistral-spm"
    spm_dir.mkdir()
    shutil.copy(real / "spm" / "tokenizer.model", spm_dir / "tokenizer.model")
    processor = SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    spm_texts = [text for text, _ in reference_cases(real, "llama-spm")]
    tiny = load_tokenizer("tiny")
    bpe_texts = [text for text, _ in reference_cases(real, "llama-bpe")]
    return [
        dict(name="llama-spm", reference="llama.cpp .out",
             tokenizer=AutoTokenizer.from_pretrained(real / "llama.cpp", gguf_file="ggml-vocab-llama-spm.gguf"),
             cases=reference_cases(real, "llama-spm")),
        dict(name="llama-bpe", reference="llama.cpp .out", tokenizer=load_tokenizer(str(real / "llama3")),
             cases=reference_cases(real, "llama-bpe")),
        dict(name="gpt-2", reference="llama.cpp .out",
             tokenizer=AutoTokenizer.from_pretrained(real / "llama.cpp", gguf_file="ggml-vocab-gpt-2.gguf"),
             cases=reference_cases(real, "gpt-2")),
        dict(name="mistral-spm (tokenizer.model alone)", reference="sentencepiece",
             tokenizer=load_tokenizer(str(spm_dir)), sentencepiece_model=spm_dir / "tokenizer.model",
             cases=[(text, processor.encode(text)) for text in spm_texts]),
        dict(name="mistral-spm, scores from merges", reference="sentencepiece", tokenizer=load_tokenizer(str(spm_dir)),
             cases=[(text, processor.encode(text)) for text in spm_texts]),
        dict(name="tiny (llama-bpe)", reference="the tiny tokenizer", tokenizer=tiny,
             cases=[(text, tiny.encode(text, add_special_tokens=False)) for text in bpe_texts]),
    ]


def token_parity(case: dict, work: Path) -> dict:
    """llama.cpp with our GGUF of the case's tokenizer, and the transformers tokenizer, against the reference ids."""
    import gguf

    path = vocab_gguf(work / f"{len(os.listdir(work))}.gguf", case["tokenizer"], case.get("sentencepiece_model"))
    fields = gguf.GGUFReader(path).fields
    llm = llama_cpp_model(path, vocab_only=True)
    try:
        cpp = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text, _ in case["cases"]]
    finally:
        llm.close()
    hf = [case["tokenizer"].encode(text, add_special_tokens=False) for text, _ in case["cases"]]
    expected = [ids for _, ids in case["cases"]]
    return {
        "vocabulary": case["name"],
        "gguf_model": fields["tokenizer.ggml.model"].contents(),
        "gguf_pre": fields["tokenizer.ggml.pre"].contents(),
        "reference": case["reference"],
        "texts": len(expected),
        "llama_cpp_equal": sum(a == b for a, b in zip(cpp, expected, strict=True)),
        "transformers_equal": sum(a == b for a, b in zip(hf, expected, strict=True)),
        "llama_cpp_differs_on": [text for (text, ids), got in zip(case["cases"], cpp, strict=True) if got != ids],
    }


def smollm2_model_dir(real: Path, work: Path) -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, dequantised by transformers, saved once as a model directory (float32
    safetensors and the tokenizer transformers builds from the file), as a base model's directory would be."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = work / "SmolLM2-135M-Instruct"
    gguf_path = real / SMOLLM2_GGUF
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from a GGUF; the dequantised weights go into a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(directory)
    return directory


def logits_parity(hf_model, tokenizer, gguf_path: Path, prompts: list[str], f32_kv_cache: bool = False) -> dict:
    """llama.cpp's logits of every position against transformers' on the same ids. llama.cpp keeps its KV cache in
    float16 unless told otherwise (``type_k=type_v=0``: float32), which alone adds ~1e-3 relative error."""
    import numpy as np
    import torch

    kv = {"type_k": 0, "type_v": 0} if f32_kv_cache else {}
    llm = llama_cpp_model(gguf_path, n_ctx=256, logits_all=True, n_threads=2, **kv)
    diffs, scales, agree, total = [], [], 0, 0
    try:
        for prompt in prompts:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            llm.reset()
            llm.eval(ids)
            cpp = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            with torch.no_grad():
                ref = hf_model(torch.tensor([ids])).logits[0].float().numpy()
            diffs.append(float(np.abs(cpp - ref).max()))
            scales.append(float(np.abs(ref).max()))
            agree += int((cpp.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
    finally:
        llm.close()
    return {"max_abs_diff": max(diffs), "logit_scale": max(scales), "relative": max(diffs) / max(scales),
            "top1_agreement": agree / total, "positions": total}


def stop_parity(hf_model, tokenizer, gguf_path: Path, template, stops: list[int], max_new_tokens: int = 64) -> list:
    """Greedy generation in llama.cpp and in transformers from the same chat prompts: where each stops, and whether
    the tokens agree."""
    import torch

    llm = llama_cpp_model(gguf_path, n_ctx=512, n_threads=2, type_k=0, type_v=0)
    rows = []
    try:
        for messages in CHATS:
            ids = tokenizer.encode(template.text(messages, add_generation_prompt=True), add_special_tokens=False)
            out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
            cpp_text = out["choices"][0]["text"]
            cpp_ids = tokenizer.encode(cpp_text, add_special_tokens=False)
            with torch.no_grad():
                generated = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                              eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):].tolist()
            hf_stopped = bool(generated) and generated[-1] in stops
            rows.append({
                "prompt": messages[-1]["content"],
                "llama_cpp_finish_reason": out["choices"][0]["finish_reason"],
                "llama_cpp_tokens": out["usage"]["completion_tokens"],
                "transformers_stopped_on": tokenizer.decode(generated[-1:]) if hf_stopped else None,
                "transformers_tokens": len(generated),
                "same_text": cpp_text == tokenizer.decode(generated[:-1] if hf_stopped else generated),
                "same_ids": cpp_ids == (generated[:-1] if hf_stopped else generated),
                "llama_cpp_text": cpp_text,
            })
    finally:
        llm.close()
    return rows


def smollm2_parity(real: Path, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.export import GGUF_FILE, export
    from finetune.models import load_tokenizer
    from finetune.templates import get_template, stop_token_ids

    torch.set_num_threads(2)
    model_dir = smollm2_model_dir(real, work)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(model_dir))
    template = get_template("chatml", tokenizer)
    stops = stop_token_ids(template, tokenizer)
    result = {"logits": {}, "stop": None}
    for dtype in DTYPES:
        started = time.time()
        out = export(model_dir, "gguf", work / f"smollm2-{dtype}", dtype=dtype, template="chatml")
        seconds = time.time() - started
        result["logits"][dtype] = {"export_seconds": round(seconds, 1),
                                   "gguf_bytes": (out / GGUF_FILE).stat().st_size,
                                   **logits_parity(hf_model, tokenizer, out / GGUF_FILE, PROMPTS)}
        print(dtype, result["logits"][dtype], flush=True)
    result["logits_f32_kv_cache"] = logits_parity(hf_model, tokenizer, work / "smollm2-f32" / GGUF_FILE, PROMPTS,
                                                  f32_kv_cache=True)
    result["stop"] = stop_parity(hf_model, tokenizer, work / "smollm2-f32" / GGUF_FILE, template, stops)
    return result


def table(results: dict) -> str:
    lines = [
        f"GGUF in llama.cpp (llama-cpp-python {results['llama_cpp_python']}), {results['date']}, {results['machine']}",
        "",
        "| vocabulary | tokenizer.ggml.model / pre | reference | llama.cpp equal | transformers equal |",
        "|---|---|---|---|---|",
    ]
    for row in results["tokens"]:
        lines.append(f"| {row['vocabulary']} | {row['gguf_model']} / {row['gguf_pre']} | {row['reference']} | "
                     f"{row['llama_cpp_equal']}/{row['texts']} | {row['transformers_equal']}/{row['texts']} |")
    if results.get("smollm2"):
        lines += ["", "SmolLM2-135M-Instruct exported with `finetune export --to gguf`, llama.cpp logits against "
                      "transformers' on the same ids:", "",
                  "| dtype | max abs diff | / largest logit | top-1 agreement | GGUF size |", "|---|---|---|---|---|"]
        rows = [(f"{dtype} (f16 KV cache, llama.cpp's default)", row, f"{row['gguf_bytes'] / 2**20:.0f} MiB")
                for dtype, row in results["smollm2"]["logits"].items()]
        if "logits_f32_kv_cache" in results["smollm2"]:
            rows.insert(0, ("f32 (f32 KV cache: `type_k=type_v=0`)", results["smollm2"]["logits_f32_kv_cache"], ""))
        for label, row, size in rows:
            lines.append(f"| {label} | {row['max_abs_diff']:.2e} | {row['relative']:.2e} | "
                         f"{row['top1_agreement']:.1%} ({row['positions']} positions) | {size} |")
        lines += ["", "Greedy chat generation (chatml, f32 GGUF): where llama.cpp stops, against transformers:", "",
                  "| prompt | llama.cpp finish / tokens | transformers stop / tokens | same ids |", "|---|---|---|---|"]
        for row in results["smollm2"]["stop"]:
            lines.append(f"| {row['prompt']} | {row['llama_cpp_finish_reason']} / {row['llama_cpp_tokens']} | "
                         f"{row['transformers_stopped_on']} / {row['transformers_tokens']} | {row['same_ids']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", default=str(ROOT / ".cache" / "real"), help="the real artifacts (tests/real/fetch.py)")
    parser.add_argument("--out", default=str(RESULTS / "gguf_llamacpp_parity.json"))
    parser.add_argument("--skip-smollm2", action="store_true", help="token ids only")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from importlib import metadata

    args = parse_args(argv)
    real = Path(args.real)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "llama_cpp_python": metadata.version("llama-cpp-python"), "tokens": [], "smollm2": None}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vocab_work = work / "vocab"
        vocab_work.mkdir()
        for case in tokenizer_cases(real, work):
            results["tokens"].append(token_parity(case, vocab_work))
            print(results["tokens"][-1], flush=True)
        if not args.skip_smollm2:
            results["smollm2"] = smollm2_parity(real, work)
    text = table(results)
    write_report(Path(args.out), results, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
