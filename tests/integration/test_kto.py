"""The KTO stage on TRL's KTOTrainer: the reference is a frozen copy of the SFT adapter on the same base, each row's
KL completion is another row's, rows are the template's tokens, and TRL's loss on a real batch equals the paper's
(tests/loss_oracles.py) over log-probs we compute ourselves. A stand-in SFT run keeps these to seconds."""

import dataclasses

import pytest
import torch
from factories import make_sft_run
from loss_oracles import kto_loss, kto_reference_point
from torch.testing import assert_close

from finetune.config import ConfigError, KTOParams, KTORunConfig, parse_args
from finetune.data import load_unpaired
from finetune.logprobs import sequence_logprobs
from finetune.preference_data import desirable_conversations, tokenize_unpaired_for_kto
from finetune.run_dir import resolve_init
from finetune.stages import dpo, kto
from finetune.templates import get_template

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = "bundled:suite_preference_eval.jsonl"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(tmp_path_factory.mktemp("sft"))


def make_trainer(sft_run, tmp_path, tokenizer, num_pairs=4, method="lora", **params):
    cfg = parse_args(KTORunConfig, ["--init", str(sft_run), "--output_dir", str(tmp_path / "run"),
                                    "--train.per_device_batch_size=4", "--train.max_steps=2",
                                    "--train.logging_steps=1", "--train.save_steps=100", "--eval.verifier=null",
                                    f"--adapter.method={method}"])
    cfg = dataclasses.replace(cfg, kto=KTOParams(**params)) if params else cfg
    cfg, init, _ = resolve_init(cfg)
    template = get_template(cfg.data.template, tokenizer)
    examples = load_unpaired(EVAL, limit=num_pairs)
    rows, _ = tokenize_unpaired_for_kto(examples, template, tokenizer, cfg.data.max_length)
    model, peft_config = kto.load_policy(cfg, init.kind)
    trainer = kto.build_trainer(cfg, model, peft_config, tokenizer, rows, [], cfg.output_dir)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return trainer, rows, batch


def logps(model, ids, attention, completion_mask):
    labels = ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    return sequence_logprobs(logits, labels)


def test_unpaired_rows_are_the_templates_tokens_and_pairs_split(tokenizer):
    template = get_template("llama3", tokenizer)
    examples = load_unpaired(EVAL, limit=2)
    rows, report = tokenize_unpaired_for_kto(examples, template, tokenizer, max_length=256)
    assert [r["label"] for r in rows] == [True, False, True, False]
    assert rows[0]["prompt_ids"] == rows[1]["prompt_ids"]
    assert tokenizer.decode(rows[0]["completion_ids"]) == examples[0].completion[0]["content"] + "<|eot_id|>"
    assert (report.kept, report.desirable, report.undesirable) == (4, 2, 2)
    assert [c.messages[-1] for c in desirable_conversations(examples)] == [examples[0].completion[0],
                                                                         examples[2].completion[0]]
    cut, cut_report = tokenize_unpaired_for_kto(examples[:1], template, tokenizer,
                                                max_length=len(rows[0]["prompt_ids"]) + 1)
    assert len(cut[0]["completion_ids"]) == 1 and cut_report.truncated_records == 1
    _, skipped = tokenize_unpaired_for_kto(examples[:1], template, tokenizer, max_length=len(rows[0]["prompt_ids"]))
    assert skipped.kept == 0 and skipped.skipped_long == 1 and "1 too long" in skipped.describe("train data")


def test_reference_is_a_frozen_copy_of_the_sft_adapter(sft_run, tokenizer, tmp_path):
    trainer, _, _ = make_trainer(sft_run, tmp_path, tokenizer)
    model = trainer.model
    assert set(model.peft_config) == {dpo.POLICY_ADAPTER, dpo.REFERENCE_ADAPTER} and trainer.ref_model is None
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    for name in trainable:
        assert torch.equal(params[name], params[name.replace(".default.", ".ref.")])


def test_each_row_is_paired_with_the_previous_rows_completion_for_the_kl_term(sft_run, tokenizer, tmp_path):
    trainer, rows, _ = make_trainer(sft_run, tmp_path, tokenizer)
    stored = trainer.train_dataset
    completions = [r["completion_ids"] for r in rows]
    # Rotated by one within each micro-batch of 4 rows: row i gets row i-1's completion, row 0 row 3's.
    assert stored["KL_completion_ids"][:4] == [completions[3], completions[0], completions[1], completions[2]]


def test_trl_kto_loss_equals_ours(sft_run, tokenizer, tmp_path):
    """The policy adapter is perturbed so r != 0; TRL's loss on a micro-batch of 4 (2 desirable, 2 undesirable)
    equals the mean of kto_loss with z_0 from kto_reference_point over the mismatched pairs, all log-probs ours."""
    from trl.trainer.utils import use_adapter

    trainer, _, batch = make_trainer(sft_run, tmp_path, tokenizer, beta=0.5, desirable_weight=1.0,
                                     undesirable_weight=1.5)
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n and "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch)
    matched = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    mismatched = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    policy, policy_kl = logps(model, *matched), logps(model, *mismatched)
    with use_adapter(model, dpo.REFERENCE_ADAPTER):
        reference, reference_kl = logps(model, *matched), logps(model, *mismatched)
    z0 = kto_reference_point(policy_kl, reference_kl)
    losses, _ = kto_loss(policy, reference, batch["label"], z0, beta=0.5, desirable_weight=1.0,
                         undesirable_weight=1.5)
    assert batch["label"].tolist().count(True) == 2
    assert (policy - reference).abs().max() > 0.1, "the perturbation should move the policy"
    assert_close(trl_loss, losses.mean(), rtol=1e-4, atol=1e-5)


def test_precomputed_reference_logps_equal_the_reference_adapter(sft_run, tokenizer, tmp_path):
    """kto.precompute_ref_log_probs: the stored log-probs (matched and mismatched) are the ref adapter's, as we
    compute them from the full logits."""
    from trl.trainer.utils import use_adapter

    trainer, _, batch = make_trainer(sft_run, tmp_path, tokenizer, precompute_ref_log_probs=True)
    stored = trainer.train_dataset
    assert {"ref_logps", "ref_KL_logps"} <= set(stored.column_names)
    trainer.model.eval()
    with use_adapter(trainer.model, dpo.REFERENCE_ADAPTER):
        ref = logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref_kl = logps(trainer.model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    assert_close(torch.tensor(stored["ref_logps"][:4]), ref, rtol=1e-4, atol=1e-4)
    assert_close(torch.tensor(stored["ref_KL_logps"][:4]), ref_kl, rtol=1e-4, atol=1e-4)


def test_qlora_policy_and_reference_share_one_4bit_base(sft_run, tokenizer, tmp_path):
    """adapter.method=qlora (llama3_8b/kto_qlora.yaml): policy and frozen reference adapters on one 4-bit NF4 base;
    two optimizer steps move the policy and leave the reference as the SFT adapter."""
    from bitsandbytes.nn import Linear4bit

    trainer, _, _ = make_trainer(sft_run, tmp_path, tokenizer, method="qlora")
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and set(layer.lora_A) == {"default", "ref"}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], after[n]) for n in before if ".default." in n)
    assert all(torch.equal(before[n], after[n]) for n in before if ".ref." in n)


def test_kto_config_checks(sft_run):
    with pytest.raises(ConfigError, match="kto needs --init"):
        KTORunConfig()
    with pytest.raises(ConfigError, match="at least 2 for kto"):
        parse_args(KTORunConfig, ["--init", str(sft_run), "--train.per_device_batch_size=1"])
    with pytest.raises(ConfigError, match="kto.undesirable_weight must be positive"):
        KTOParams(undesirable_weight=0.0)
    with pytest.raises(ConfigError, match="data.format"):
        parse_args(KTORunConfig, ["--init", str(sft_run), "--data.format=alpaca"])
    assert parse_args(KTORunConfig, ["--init", str(sft_run), "--data.format=unpaired"]).data.format == "unpaired"
