"""Attention backend choice, packed equals unpacked under every backend here, and Liger's kernels (GPU)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.config import ModelConfig
from finetune.kernels import (
    available_attention_backends,
    choose_attention,
    choose_liger,
    resolve_attn_implementation,
)
from finetune.models import load_base_model

ROOT = Path(__file__).resolve().parents[2]
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "requested, dtype, cuda, capability, flash3, flash2, expected",
    [
        ("auto", FP32, False, None, False, False, "sdpa_packed"),  # CPU
        ("auto", BF16, True, (9, 0), True, True, "flash_attention_3"),  # H100 with FA3
        ("auto", BF16, True, (9, 0), False, True, "flash_attention_2"),  # H100 with FA2 only
        ("auto", BF16, True, (8, 0), True, True, "flash_attention_2"),  # A100: FA3 is Hopper-only
        ("auto", BF16, True, (8, 0), False, False, "sdpa_packed"),  # A100 without flash-attn
        ("auto", BF16, True, (7, 5), False, True, "sdpa_packed"),  # T4: too old for FlashAttention 2
        ("auto", FP32, True, (9, 0), True, True, "sdpa_packed"),  # FlashAttention has no float32
        ("sdpa", FP32, False, None, False, False, "sdpa"),  # plain SDPA stays available
        ("eager", BF16, True, (9, 0), True, True, "eager"),  # an explicit choice is kept
        ("flash_attention_2", FP32, False, None, False, False, "flash_attention_2"),
    ],
)
def test_choose_attention(requested, dtype, cuda, capability, flash3, flash2, expected):
    choice = choose_attention(requested, dtype, cuda, capability, flash3, flash2)
    assert choice.implementation == expected
    assert choice.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_is_packed_sdpa_on_cpu(tmp_path):
    """On a machine without CUDA, ``auto`` loads the model with SDPA (one packed conversation at a time) and says
    why; a saved model does not carry the name, so it loads anywhere."""
    assert resolve_attn_implementation("auto", FP32) == "sdpa_packed"
    model = load_base_model(ModelConfig(attn_implementation="auto"), "full", for_training=False)
    assert model.config._attn_implementation == "sdpa_packed"
    model.save_pretrained(tmp_path)
    assert "sdpa_packed" not in (tmp_path / "config.json").read_text()


def padded_and_packed(rows, pad_token_id):
    """The same conversations as a right-padded batch with a mask, and as one padding-free row (TRL's collator:
    positions restarting per conversation, ``cu_seq_lens`` for the varlen kernels, no mask)."""
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)(rows)
    packed_rows = [
        {
            "input_ids": [t for r in rows for t in r["input_ids"]],
            "labels": [t for r in rows for t in r["labels"]],
            "seq_lengths": [len(r["input_ids"]) for r in rows],
        }
    ]
    packed = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)(packed_rows)
    assert "attention_mask" not in packed
    return padded, packed


def assert_packed_equals_padded(model, rows, padded, packed, atol, rtol, loss_tol):
    device = next(model.parameters()).device
    with torch.no_grad():
        out_padded = model(**{k: v.to(device) for k, v in padded.items()})
        out_packed = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items()})
    offset = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        torch.testing.assert_close(
            out_packed.logits[0, offset : offset + n].float(), out_padded.logits[i, :n].float(), atol=atol, rtol=rtol
        )
        offset += n
    torch.testing.assert_close(out_packed.loss.float(), out_padded.loss.float(), atol=loss_tol, rtol=loss_tol)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_packed", "eager"])
def test_packed_equals_padded_on_cpu(tokenizer, rows, backend):
    """Five conversations of different lengths, padded with a mask and packed into one row without one: under each
    CPU backend the packed conversations do not see each other (identical logits at every real token, same loss)."""
    assert backend in available_attention_backends()
    model = load_base_model(ModelConfig(attn_implementation=backend), "full", for_training=True).eval()
    assert model.config._attn_implementation == backend
    padded, packed = padded_and_packed(rows, tokenizer.pad_token_id)
    assert_packed_equals_padded(model, rows, padded, packed, atol=1e-5, rtol=1e-4, loss_tol=1e-5)


@pytest.mark.gpu
def test_flash_attention_packed_equals_padded_on_gpu(tokenizer, rows):
    """On a GPU, ``auto`` picks FlashAttention where installed; its varlen path keeps packed conversations apart
    (bf16 tolerance against its own padded batch), and it agrees with SDPA."""
    flash = [b for b in available_attention_backends() if b.startswith("flash")]
    if not flash:
        pytest.skip("no FlashAttention on this GPU (pip install flash-attn)")
    cfg = ModelConfig(attn_implementation="auto", dtype="bfloat16")
    assert resolve_attn_implementation("auto", BF16) == flash[0]
    model = load_base_model(cfg, "full", for_training=True).cuda().eval()
    assert model.config._attn_implementation == flash[0]
    padded, packed = padded_and_packed(rows, tokenizer.pad_token_id)
    assert_packed_equals_padded(model, rows, padded, packed, atol=0.1, rtol=0.05, loss_tol=2e-2)
    sdpa = load_base_model(ModelConfig(attn_implementation="sdpa", dtype="bfloat16"), "full").cuda().eval()
    with torch.no_grad():
        flash_loss = model(**{k: v.cuda() for k, v in padded.items()}).loss
        sdpa_loss = sdpa(**{k: v.cuda() for k, v in padded.items()}).loss
    torch.testing.assert_close(flash_loss.float(), sdpa_loss.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Liger


def test_choose_liger():
    assert not choose_liger(False, True, True).on
    assert not choose_liger(True, False, True).on and "no CUDA" in choose_liger(True, False, True).reason
    assert not choose_liger(True, True, False).on and "not installed" in choose_liger(True, True, False).reason
    assert choose_liger(True, True, True).on


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_liger_off_without_gpu_leaves_model_unchanged():
    """``use_liger`` asks for the kernels; without a GPU the model is loaded exactly as without it."""
    with_liger = load_base_model(ModelConfig(use_liger=True), "full", for_training=False).eval()
    without = load_base_model(ModelConfig(use_liger=False), "full", for_training=False).eval()
    assert type(with_liger.model.norm).forward is type(without.model.norm).forward
    assert "forward" not in with_liger.model.norm.__dict__  # no instance patch
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(with_liger(input_ids=ids).logits, without(input_ids=ids).logits, atol=0, rtol=0)


@pytest.fixture
def restore_llama_module():
    """Liger patches ``transformers.models.llama.modeling_llama`` itself; put it back after the test."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


def _llama_bf16(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.tiny import MODEL_SHAPE

    config = LlamaConfig(vocab_size=2048, **{**MODEL_SHAPE, "hidden_size": 256, "intermediate_size": 704})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).train()


@pytest.mark.gpu
def test_liger_matches_unfused_loss_and_gradients(restore_llama_module):
    """Liger's fused RMSNorm, RoPE and SwiGLU give the unfused model's loss and gradients within bf16 tolerance,
    on a padded batch and on a packed one."""
    pytest.importorskip("liger_kernel")
    from finetune.kernels import apply_liger

    reference = _llama_bf16()
    fused = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2048, (2, 128), generator=generator).cuda()
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    positions = torch.cat([torch.arange(50), torch.arange(78)]).unsqueeze(0).cuda()

    def loss_and_grads(model, **batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    batches = [dict(input_ids=ids, attention_mask=mask, labels=labels),
               dict(input_ids=ids[:1], position_ids=positions, labels=ids[:1])]
    expected = [loss_and_grads(reference, **b) for b in batches]
    assert apply_liger(fused, True)
    for batch, (ref_loss, ref_grads) in zip(batches, expected):
        loss, grads = loss_and_grads(fused, **batch)
        torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
        for name, grad in grads.items():
            scale = ref_grads[name].abs().max().clamp(min=1e-6)
            assert (grad - ref_grads[name]).abs().max() / scale < 0.05, name


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_gpu_benchmark_exits_cleanly_without_cuda(tmp_path):
    """``benchmarks/gpu_sft.py`` on a CPU-only machine: one line saying why, exit status 0, nothing written."""
    out = tmp_path / "gpu_sft.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_sft.py"), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0]
    assert not out.exists()


def test_4bit_layers_bitsandbytes_cannot_repack_for_its_cpu_kernel_keep_their_layout():
    # bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs at the first no-grad forward, and raises for a layer
    # whose inputs are not a multiple of its block (64): the tiny MLP's down_proj (352 inputs). Found on such a CPU,
    # where every QLoRA evaluation crashed; here every CPU is made to look like one.
    from bitsandbytes.nn import Linear4bit

    from finetune.models import keep_unpacked_4bit_where_cpu_packing_fails

    model = load_base_model(ModelConfig(name="tiny"), "qlora", for_training=False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = True
    assert keep_unpacked_4bit_where_cpu_packing_fails(model) == model.config.num_hidden_layers
    unpacked = {name for name, m in layers.items() if not m.support_avx512bf16_for_cpu}
    assert unpacked == {name for name in layers if name.endswith("mlp.down_proj")}
    # On the real CPU (whatever it supports) a no-grad forward of the freshly loaded model runs.
    model = load_base_model(ModelConfig(name="tiny"), "qlora", for_training=False)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_packed_sdpa_attends_within_each_conversation_only():
    """Random q/k/v for a row of three conversations (GQA, 4 query and 2 key/value heads): the packed path equals
    causal SDPA over each conversation alone; without cu_seq_lens (a padded batch) it is transformers' SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    from finetune.kernels import packed_sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    cu = torch.tensor([0, 3, 8, 12], dtype=torch.int32)
    out, _ = packed_sdpa_attention_forward(module, query, key, value, None, scaling=0.5, cu_seq_lens_q=cu,
                                           cu_seq_lens_k=cu)
    k, v = repeat_kv(key, 2), repeat_kv(value, 2)
    for start, end in ((0, 3), (3, 8), (8, 12)):
        alone = torch.nn.functional.scaled_dot_product_attention(query[:, :, start:end], k[:, :, start:end],
                                                                 v[:, :, start:end], is_causal=True, scale=0.5)
        torch.testing.assert_close(out[:, start:end], alone.transpose(1, 2))
    plain, _ = packed_sdpa_attention_forward(module, query, key, value, None, scaling=0.5)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.5)
    torch.testing.assert_close(plain, expected)
