"""Export: adapter, merged safetensors, GGUF, Ollama Modelfile, metadata, and what a bad input does.

Run directories are built here the way ``finetune/stages/sft.py`` leaves them (adapter, tokenizer with its chat
template, generation config, ``config.yaml``) on the shipped tiny LLaMA, with LoRA B matrices set to random values so
the adapter changes the logits. Each comparison states its tolerance; the figures measured are in docs/export.md.
"""

import os

from factories import PROMPTS, logits_of, make_run_dir, max_abs_diff  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from finetune import cli  # noqa: E402
from finetune.export import METADATA_FILE, ExportError, export  # noqa: E402
from finetune.models import resolve_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def base_plus_adapter(run_dir: Path):
    """The reference: the tiny base in float32 with the run's adapter applied by PEFT (not merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"), dtype=torch.float32)
    return PeftModel.from_pretrained(base, run_dir).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "sft")


@pytest.fixture(scope="module")
def reference_logits(run_dir, tokenizer):
    return logits_of(base_plus_adapter(run_dir), tokenizer)


# ----------------------------------------------------------------------------------------------------------- adapter


def test_adapter_export_loads_onto_the_base_with_peft(run_dir, tmp_path, tokenizer, reference_logits):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = export(run_dir, "adapter", tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"), dtype=torch.float32)
    plain = logits_of(base, tokenizer)
    loaded = PeftModel.from_pretrained(base, out).eval()
    assert max_abs_diff(logits_of(loaded, tokenizer), reference_logits) == 0.0
    assert max_abs_diff(plain, reference_logits) > 1e-3, "the adapter must change the logits for this test to mean much"
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(run_dir).chat_template
    eot, eos = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert GenerationConfig.from_pretrained(out).eos_token_id == [eot, eos]


# ------------------------------------------------------------------------------------------------------------ merged


def test_merged_equals_base_plus_adapter_and_loads_alone(run_dir, tmp_path, tokenizer, reference_logits):
    from transformers import AutoModelForCausalLM

    out = export(run_dir, "merged", tmp_path / "merged", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # nothing else: no peft, no base
    assert not any("lora" in name for name, _ in model.named_parameters())
    diff = max_abs_diff(logits_of(model, tokenizer), reference_logits)
    assert diff < 1e-4, diff  # float32: merging reorders one sum (W x + B A x); measured 2.8e-5 at logit scale 13.5
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["dtype"] == "float32" and metadata["adapter_method"] == "lora"
    # a merged export is itself a model directory: it exports again, keeping its template and origin
    again = json.loads((export(out, "gguf", tmp_path / "gguf", dtype="f32") / METADATA_FILE).read_text())
    assert (again["template"], again["base_model"], again["stop_tokens"]) == ("llama3", "tiny", metadata["stop_tokens"])


def test_merged_export_generates_with_the_kv_cache(tmp_path, tokenizer):
    """Training switches the cache off (``use_cache: false`` in the run's configs); the export switches it back on,
    so plain ``generate()`` feeds one new token per step instead of the whole prefix again."""
    from transformers import AutoModelForCausalLM

    run = make_run_dir(tmp_path / "full", method="full", seed=4)
    for name in ("config.json", "generation_config.json"):  # as a run saved with the cache off
        config = json.loads((run / name).read_text()) if (run / name).is_file() else {}
        (run / name).write_text(json.dumps({**config, "use_cache": False}))
    out = export(run, "merged", tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is True

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    fed = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    prompt = torch.tensor([tokenizer.encode(PROMPTS[0], add_special_tokens=False)])
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert fed == [prompt.shape[1], 1, 1, 1]


def test_adapter_export_generation_config_has_the_cache_on(run_dir, tmp_path):
    out = export(run_dir, "adapter", tmp_path / "adapter")
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is True


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_merged_half_precision(run_dir, tmp_path, tokenizer, reference_logits, dtype, torch_dtype):
    """Half precision: weights stored in the dtype; logits within the rounding of 16-bit weights (stated bounds)."""
    from transformers import AutoModelForCausalLM

    out = export(run_dir, "merged", tmp_path / dtype, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch_dtype
    got = logits_of(model.float(), tokenizer)
    scale = max(x.abs().max().item() for x in reference_logits)
    assert max_abs_diff(got, reference_logits) / scale < (0.03 if dtype == "bfloat16" else 0.005)
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(got, reference_logits, strict=True)])
    assert agree.mean().item() >= 0.9


def test_qlora_run_is_merged_into_an_unquantised_base(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    run = make_run_dir(tmp_path / "qlora", method="qlora", seed=1)
    out = export(run, "merged", tmp_path / "merged", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max_abs_diff(logits_of(model, tokenizer), logits_of(base_plus_adapter(run), tokenizer)) < 1e-4
    assert json.loads((out / METADATA_FILE).read_text())["adapter_method"] == "qlora"


def test_adapter_trained_on_a_full_fine_tune_goes_onto_that_model(tmp_path, tokenizer):
    """An adapter run started from a full-weights run (DPO or rejection sampling after sft_full.yaml) trained on
    those weights: the export puts it there, not on model.name's base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = make_run_dir(tmp_path / "sft_full", method="full", seed=2)
    run = make_run_dir(tmp_path / "dpo", seed=3)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "init": str(full)}, sort_keys=False))
    out = export(run, "merged", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(full), run).eval()
    assert max_abs_diff(logits_of(merged, tokenizer), logits_of(on_full, tokenizer)) < 1e-4
    assert max_abs_diff(logits_of(merged, tokenizer), logits_of(base_plus_adapter(run), tokenizer)) > 1e-3
    assert json.loads((out / METADATA_FILE).read_text())["base_model"] == str(full.resolve())
    # Without that directory the export cannot put the adapter where it trained (PEFT recorded that base).
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(full)}))
    shutil.rmtree(full)
    with pytest.raises(ExportError, match="which is not there"):
        export(run, "merged", tmp_path / "merged2")


def test_full_fine_tune_exports_merged_and_gguf(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    run = make_run_dir(tmp_path / "full", method="full", seed=2)
    with pytest.raises(ExportError, match="no adapter"):
        export(run, "adapter", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    out = export(run, "merged", tmp_path / "merged")
    original = AutoModelForCausalLM.from_pretrained(run).eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_abs_diff(logits_of(exported, tokenizer), logits_of(original, tokenizer)) == 0.0
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["base_model"] == "tiny" and metadata["adapter_method"] == "full"
    gguf_out = export(run, "gguf", tmp_path / "gguf", dtype="f32")
    assert (gguf_out / "model.gguf").is_file()


# ---------------------------------------------------------------------------------------------- metadata and errors


def test_metadata_records_origin_and_weight_hash(run_dir, tmp_path):
    import hashlib

    out = export(run_dir, "adapter", tmp_path / "adapter")
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["base_model"] == "tiny"
    assert metadata["run_dir"] == str(run_dir.resolve())
    assert metadata["adapter_method"] == "lora"
    assert metadata["template"] == "llama3"
    assert metadata["stop_tokens"] == ["<|eot_id|>", "<|end_of_text|>"]
    assert metadata["toolkit_version"] == "0.1.0"
    (weights,) = metadata["weights"]
    assert weights["file"] == "adapter_model.safetensors"
    assert weights["sha256"] == hashlib.sha256((out / weights["file"]).read_bytes()).hexdigest()


def _cli(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, run: [str(tmp / "missing"), "--to", "merged"], "is not a directory"),
        (lambda tmp, run: [str(tmp), "--to", "merged"], "neither a PEFT adapter"),
        (lambda tmp, run: [str(run), "--to", "onnx"], "unknown export format 'onnx'"),
        (lambda tmp, run: [str(run), "--to", "gguf", "--dtype", "q4_k"], "--to gguf takes --dtype f32, f16, q8_0"),
        (lambda tmp, run: [str(run), "--to", "merged", "--dtype", "f16"], "--to merged takes --dtype"),
        (lambda tmp, run: [str(run), "--to", "adapter", "--template", "zephyr"], "unknown template 'zephyr'"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_leave_nothing(run_dir, tmp_path, capsys, make_args, message):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    status, stdout, stderr = _cli(["export", *make_args(work, run_dir), "--out", str(out)], capsys)
    assert status == 2
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no staging directory left behind


def test_missing_base_model_is_a_user_error(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name"] = str(tmp_path / "no-such-base")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    status, _, stderr = _cli(["export", str(run), "--to", "merged", "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and stderr.startswith("error: cannot load the base model") and stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_output_needs_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    status, _, stderr = _cli(["export", str(run_dir), "--to", "adapter", "--out", str(out)], capsys)
    assert status == 2 and "already exists; pass --overwrite" in stderr
    assert (out / "keep.txt").read_text() == "user data"
    status, stdout, _ = _cli(["export", str(run_dir), "--to", "adapter", "--out", str(out), "--overwrite"], capsys)
    assert status == 0 and "exported" in stdout
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_mid_export_leaves_no_output(run_dir, tmp_path, monkeypatch):
    import finetune.export as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "_sha256", broken)  # fails after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        export(run_dir, "merged", tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []
