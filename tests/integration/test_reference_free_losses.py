"""dpo.loss: orpo and simpo on TRL's ORPOTrainer and CPOTrainer: no reference adapter is built, the rows are the DPO
stage's own tokens, and TRL's loss on a real batch equals the paper's (tests/loss_oracles.py) over log-probs we
compute ourselves. A stand-in SFT run keeps these to seconds; tests/integration/test_dpo_recipe.py-style chaining from a real SFT
run is in test_preference_recipes.py."""

import dataclasses

import pytest
import torch
from factories import make_sft_run
from loss_oracles import orpo_odds_ratio_loss, sft_loss, simpo_loss
from torch.testing import assert_close

from finetune.config import ConfigError, DPOParams, DPORunConfig, parse_args
from finetune.data import load_preferences
from finetune.logprobs import sequence_logprobs
from finetune.preference_data import reference_free_rows, tokenize_pairs_for_dpo
from finetune.run_dir import resolve_init
from finetune.stages import dpo
from finetune.templates import get_template

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = "bundled:suite_preference_eval.jsonl"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(tmp_path_factory.mktemp("sft"))


def make_trainer(sft_run, tmp_path, tokenizer, num_pairs=4, method="lora", **params):
    cfg = parse_args(DPORunConfig, ["--init", str(sft_run), "--output_dir", str(tmp_path / "run"),
                                    "--train.per_device_batch_size=2", "--train.max_steps=2",
                                    "--train.logging_steps=1", "--train.save_steps=100", "--eval.verifier=null",
                                    f"--adapter.method={method}"])
    cfg = dataclasses.replace(cfg, dpo=DPOParams(**params))
    cfg, init, _ = resolve_init(cfg)
    template = get_template(cfg.data.template, tokenizer)
    rows, _ = tokenize_pairs_for_dpo(load_preferences(EVAL, limit=num_pairs), template, tokenizer, cfg.data.max_length)
    model, peft_config = dpo.load_policy(cfg, init.kind)
    trainer = dpo.build_trainer(cfg, model, peft_config, tokenizer, rows, [], cfg.output_dir)
    return trainer, rows, trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])


def perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()


def side_logits(model, batch, side):
    with torch.no_grad():
        return model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits


def test_reference_free_rows_are_the_dpo_tokens():
    row = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}
    (out,) = reference_free_rows([row])
    assert out["chosen_input_ids"] == [1, 2, 3, 4, 5] and out["chosen_labels"] == [-100, -100, -100, 4, 5]
    assert out["rejected_input_ids"] == [1, 2, 3, 6] and out["rejected_labels"] == [-100, -100, -100, 6]
    assert out["prompt_input_ids"] == [1, 2, 3] and out["chosen_attention_mask"] == [1] * 5


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_no_reference_adapter_is_built(loss, sft_run, tokenizer, tmp_path):
    params = dict(loss=loss, nll_weight=1.0) if loss == "orpo" else dict(loss=loss, beta=2.0, simpo_gamma=1.0)
    trainer, rows, batch = make_trainer(sft_run, tmp_path, tokenizer, **params)
    assert list(trainer.model.peft_config) == [dpo.POLICY_ADAPTER]
    # The trainer scores exactly the DPO stage's tokens: prompt then reply, the prompt masked.
    assert batch["chosen_input_ids"][0, : len(rows[0]["prompt_ids"]) + len(rows[0]["chosen_ids"])].tolist() == \
        rows[0]["prompt_ids"] + rows[0]["chosen_ids"]


def test_trl_orpo_loss_equals_ours(sft_run, tokenizer, tmp_path):
    """ORPO = the token-mean NLL of the whole chosen sequence (prompt included, as TRL and the ORPO authors' code
    compute it: sft_loss with every real token a label) + the mean odds-ratio term on per-token mean log-probs."""
    trainer, _, batch = make_trainer(sft_run, tmp_path, tokenizer, loss="orpo", beta=0.1, nll_weight=1.0)
    perturb(trainer.model)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    chosen_logits, rejected_logits = (side_logits(trainer.model, batch, side) for side in ("chosen", "rejected"))
    chosen = sequence_logprobs(chosen_logits, batch["chosen_labels"], average=True)
    rejected = sequence_logprobs(rejected_logits, batch["rejected_labels"], average=True)
    losses, _, _ = orpo_odds_ratio_loss(chosen, rejected, lam=0.1)
    whole_sequence = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, -100)
    expected = sft_loss(chosen_logits, whole_sequence)[0] + losses.mean()
    assert losses.mean() > 1e-3
    assert_close(trl_loss, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nll_weight", [0.0, 0.5])
def test_trl_simpo_loss_equals_ours(nll_weight, sft_run, tokenizer, tmp_path):
    """SimPO on per-token mean log-probs of the replies, with dpo.nll_weight times the chosen replies' token-mean NLL
    (the DPO stage's term, reply tokens only) when it is set."""
    trainer, _, batch = make_trainer(sft_run, tmp_path, tokenizer, loss="simpo", beta=2.0, simpo_gamma=1.0,
                                     nll_weight=nll_weight)
    perturb(trainer.model)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    chosen_logits, rejected_logits = (side_logits(trainer.model, batch, side) for side in ("chosen", "rejected"))
    chosen = sequence_logprobs(chosen_logits, batch["chosen_labels"], average=True)
    rejected = sequence_logprobs(rejected_logits, batch["rejected_labels"], average=True)
    losses, _, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    expected = losses.mean() + nll_weight * sft_loss(chosen_logits, batch["chosen_labels"])[0]
    assert_close(trl_loss, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_qlora_policy_trains_on_a_4bit_base_alone(loss, sft_run, tokenizer, tmp_path):
    """adapter.method=qlora (the llama3_8b configs): the SFT adapter on a 4-bit NF4 base is the only adapter, and two
    optimizer steps move it."""
    from bitsandbytes.nn import Linear4bit

    params = dict(loss=loss, nll_weight=1.0) if loss == "orpo" else dict(loss=loss, beta=2.0, simpo_gamma=1.0)
    trainer, _, _ = make_trainer(sft_run, tmp_path, tokenizer, method="qlora", **params)
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and set(layer.lora_A) == {dpo.POLICY_ADAPTER}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_reference_free_config_checks():
    with pytest.raises(ConfigError, match="nll_weight=1"):
        DPOParams(loss="orpo")
    with pytest.raises(ConfigError, match="no reference"):
        DPOParams(loss="simpo", precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="only to dpo.loss=simpo"):
        DPOParams(loss="sigmoid", simpo_gamma=1.0)
    with pytest.raises(ConfigError, match="simpo_gamma must be >= 0"):
        DPOParams(loss="simpo", simpo_gamma=-1.0)
    assert not DPOParams(loss="simpo", simpo_gamma=1.0).uses_reference and DPOParams().uses_reference
