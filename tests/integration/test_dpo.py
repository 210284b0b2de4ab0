"""DPO on one base with policy and reference adapters: the reference is the SFT model, TRL's loss is ours, log-probs
cover the reply only, and bad input fails in one line. A stand-in SFT run (a random non-zero LoRA adapter saved like
recipes/sft.py saves one) keeps these tests to seconds; tests/integration/test_dpo_recipe.py chains from a real SFT run."""

import dataclasses
import json

import pytest
import torch
from factories import make_full_sft_run, make_sft_run  # noqa: E402
from loss_oracles import dpo_hinge_loss, dpo_label_smoothed_loss, dpo_sigmoid_loss, ipo_loss, sft_loss
from torch.testing import assert_close

from finetune.config import ConfigError, DPOParams, DPORunConfig, parse_args
from finetune.data import load_preferences
from finetune.launch import launch
from finetune.logprobs import sequence_logprobs
from finetune.models import resolve_model
from finetune.preference_data import split_pair, tokenize_pairs_for_dpo
from finetune.run_dir import resolve_init
from finetune.stages import dpo
from finetune.templates import get_template

EVAL = "bundled:suite_preference_eval.jsonl"






@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(tmp_path_factory.mktemp("sft"))


def dpo_config(sft_run, tmp_path, **dpo_params):
    cfg = parse_args(DPORunConfig, ["--init", str(sft_run), "--output_dir", str(tmp_path / "dpo"),
                                 "--train.per_device_batch_size=2", "--train.max_steps=2", "--train.logging_steps=1",
                                 "--train.save_steps=100", "--eval.verifier=null"])
    return dataclasses.replace(cfg, dpo=DPOParams(**dpo_params)) if dpo_params else cfg


def make_trainer(cfg, tokenizer, num_pairs=4):
    cfg, init, _ = resolve_init(cfg)
    kind = init.kind
    template = get_template(cfg.data.template, tokenizer)
    rows, _ = tokenize_pairs_for_dpo(load_preferences(EVAL, limit=num_pairs), template, tokenizer, cfg.data.max_length)
    model, peft_config = dpo.load_policy(cfg, kind)
    trainer = dpo.build_trainer(cfg, model, peft_config, tokenizer, rows, [], cfg.output_dir)
    return trainer, trainer.data_collator(rows)


def forward_logps(model, batch, average=False):
    """Per-sequence log-probs from the full logits with our sequence_logprobs: [chosen..., rejected...]."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, labels, average=average)


def sft_model(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    return PeftModel.from_pretrained(base, str(sft_run)).eval()


def test_policy_and_reference_are_two_adapters_on_one_base(sft_run, tokenizer, tmp_path):
    trainer, _ = make_trainer(dpo_config(sft_run, tmp_path), tokenizer)
    model = trainer.model
    assert set(model.peft_config) == {dpo.POLICY_ADAPTER, dpo.REFERENCE_ADAPTER}
    assert trainer.ref_model is None  # no second model: the reference is an adapter on the same base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{dpo.POLICY_ADAPTER}." in n for n in trainable)
    # Both adapters start as the SFT adapter.
    params = dict(model.named_parameters())
    for name in trainable:
        assert torch.equal(params[name], params[name.replace(".default.", ".ref.")])


def test_reference_logps_during_training_equal_the_sft_model_not_the_base(sft_run, tokenizer, tmp_path):
    """After two optimizer steps the policy has moved; the reference log-probs TRL uses are still the SFT model's
    (base + SFT adapter, loaded independently), and clearly not the raw base's."""
    from transformers import AutoModelForCausalLM

    cfg = dpo_config(sft_run, tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=1e-2))
    trainer, batch = make_trainer(cfg, tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    ref = torch.cat([ref_chosen, ref_rejected])

    sft = forward_logps(sft_model(sft_run), batch)
    base = forward_logps(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval(), batch)
    trainer.model.eval()
    policy = forward_logps(trainer.model, batch)
    assert_close(ref, sft, rtol=1e-4, atol=1e-4)
    assert (ref - base).abs().max() > 0.05, "the reference must not be the raw base"
    assert (ref - policy).abs().max() > 0.05, "the policy trained, the reference did not"


def test_full_weights_sft_run_becomes_the_base_and_the_reference(tokenizer, tmp_path):
    """From a full fine-tune the SFT model is the base: the policy is a new LoRA adapter on it and the reference is
    that base with the adapter off, i.e. again the SFT model, not the original tiny base."""
    from transformers import AutoModelForCausalLM

    full_dir = make_full_sft_run(tmp_path / "sft_full", noise=0.05)
    full = AutoModelForCausalLM.from_pretrained(full_dir)
    trainer, batch = make_trainer(dpo_config(full_dir, tmp_path), tokenizer)
    assert list(trainer.model.peft_config) == ["default"]
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    assert_close(ref, forward_logps(full.eval(), batch), rtol=1e-4, atol=1e-4)
    base = forward_logps(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval(), batch)
    assert (ref - base).abs().max() > 0.05


def test_logprobs_sum_over_reply_tokens_only(sft_run, tokenizer, tmp_path):
    """The reply tokens are exactly the chosen text and <|eot_id|>; TRL's per-sequence log-prob is the sum over those
    positions, computed here by hand from the full logits, and not the sum that also counts the prompt."""
    trainer, batch = make_trainer(dpo_config(sft_run, tmp_path), tokenizer, num_pairs=2)
    pair = load_preferences(EVAL, limit=1)[0]
    mask = batch["completion_mask"][0].bool()
    reply = tokenizer.decode(batch["input_ids"][0][mask])
    assert reply == pair.chosen[0]["content"] + "<|eot_id|>"
    prompt = tokenizer.decode(batch["input_ids"][0][: int(mask.nonzero()[0])])
    assert prompt.endswith(pair.prompt[-1]["content"] + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    model = sft_model(sft_run)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = batch["input_ids"]
    for row, trl_value in enumerate(torch.cat([ref_chosen, ref_rejected])):
        reply_sum = sum(logp[row, t - 1, ids[row, t]] for t in range(1, ids.shape[1]) if batch["completion_mask"][row, t])
        all_sum = sum(logp[row, t - 1, ids[row, t]] for t in range(1, ids.shape[1]) if batch["attention_mask"][row, t])
        assert_close(trl_value, reply_sum, rtol=1e-4, atol=1e-4)
        assert abs(trl_value - all_sum) > 1.0


LOSSES = {
    "sigmoid": (dict(loss="sigmoid", beta=0.1), lambda *a: dpo_sigmoid_loss(*a, beta=0.1), False),
    "ipo": (dict(loss="ipo", beta=0.5), lambda *a: ipo_loss(*a, beta=0.5), True),
    "hinge": (dict(loss="hinge", beta=0.1), lambda *a: dpo_hinge_loss(*a, beta=0.1), False),
    "label_smoothed": (
        dict(loss="label_smoothed", beta=0.1, label_smoothing=0.2),
        lambda *a: dpo_label_smoothed_loss(*a, beta=0.1, label_smoothing=0.2),
        False,
    ),
}


@pytest.mark.parametrize("name", [*LOSSES, "sigmoid+nll"])
def test_trl_loss_equals_ours_on_the_same_batch(name, sft_run, tokenizer, tmp_path):
    """The policy adapter is perturbed so it differs from the reference (h != 0); TRL's loss on a batch equals the
    mean of the paper's loss (tests/loss_oracles.py) over log-probs we compute ourselves (IPO on per-token means, as
    TRL does). With dpo.nll_weight, plus that weight times the oracle sft_loss over the chosen replies."""
    from trl.trainer.utils import use_adapter

    nll_weight = 0.2 if name == "sigmoid+nll" else 0.0
    params, ours, average = LOSSES[name.removesuffix("+nll")]
    trainer, batch = make_trainer(dpo_config(sft_run, tmp_path, **params, nll_weight=nll_weight), tokenizer)
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n and "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch)
    policy = forward_logps(model, batch, average)
    with use_adapter(model, dpo.REFERENCE_ADAPTER):
        reference = forward_logps(model, batch, average)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    losses, chosen_rewards, _ = ours(pc, pr, rc, rr)
    expected = losses.mean()
    if nll_weight:
        chosen = slice(0, batch["input_ids"].shape[0] // 2)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[chosen]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"][chosen], attention_mask=batch["attention_mask"][chosen]).logits
        expected = expected + nll_weight * sft_loss(logits, labels)[0]
    assert (pc - rc).abs().max() > 0.1, "the perturbation should move the policy"
    assert_close(trl_loss, expected, rtol=1e-4, atol=1e-5)


def test_trl_loss_mapping():
    """cDPO is TRL's sigmoid and robust losses combined: 2(1-e) A - (1-2e) R = (1-e) A + e B (see dpo.trl_loss)."""
    assert dpo.trl_loss(DPOParams(loss="ipo", nll_weight=0.0)) == dict(loss_type=["ipo"], loss_weights=[1.0], label_smoothing=0.0)
    with_nll = dpo.trl_loss(DPOParams(nll_weight=0.2))
    assert with_nll["loss_type"] == ["sigmoid", "sft"] and with_nll["loss_weights"] == [1.0, 0.2]
    mapped = dpo.trl_loss(DPOParams(loss="label_smoothed", label_smoothing=0.25, nll_weight=0.0))
    assert mapped == dict(loss_type=["sigmoid", "robust"], loss_weights=[1.5, -0.5], label_smoothing=0.25)


def test_precomputed_reference_logps_equal_the_reference_adapter(sft_run, tokenizer, tmp_path):
    trainer, batch = make_trainer(dpo_config(sft_run, tmp_path, precompute_ref_log_probs=True), tokenizer)
    stored = trainer.train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(stored.column_names)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    assert_close(torch.tensor(stored["ref_chosen_logps"]), ref_chosen, rtol=1e-4, atol=1e-4)
    assert_close(torch.tensor(stored["ref_rejected_logps"]), ref_rejected, rtol=1e-4, atol=1e-4)


def test_qlora_policy_and_reference_share_one_4bit_base(sft_run, tokenizer, tmp_path):
    """adapter.method=qlora: the SFT adapter goes on a 4-bit NF4 base as policy and reference; before any step
    both score a batch alike (to bf16 rounding: TRL keeps a quantised model's trainable adapter in bf16, the frozen
    reference copy in fp32), and training runs."""
    from bitsandbytes.nn import Linear4bit

    cfg = dpo_config(sft_run, tmp_path)
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, method="qlora"))
    trainer, batch = make_trainer(cfg, tokenizer)
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and set(layer.lora_A) == {"default", "ref"}
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    trainer.model.eval()
    policy = forward_logps(trainer.model, batch)
    assert_close(torch.cat([ref_chosen, ref_rejected]), policy, rtol=5e-3, atol=1e-2)
    trainer.train()
    assert trainer.state.global_step == 2


# --------------------------------------------------------------------------------------------------------------------
# Preference rows: long prompts, long replies, identical replies are counted, never silent


def test_tokenize_pairs_counts_cuts_and_skips(tokenizer):
    from data_formats import PreferencePair

    template = get_template("llama3", tokenizer)
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    pairs = [
        PreferencePair(user, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}], "a:1", {}),
        PreferencePair(user, [{"role": "assistant", "content": "4 " * 40}], [{"role": "assistant", "content": "5"}],
                       "a:2", {}),
        PreferencePair(user, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "4"}], "a:3", {}),
        PreferencePair([{"role": "user", "content": "long " * 60}], [{"role": "assistant", "content": "4"}],
                       [{"role": "assistant", "content": "5"}], "a:4", {}),
    ]
    prompt_len = len(split_pair(pairs[0], template, tokenizer)[0])
    rows, report = tokenize_pairs_for_dpo(pairs, template, tokenizer, max_length=prompt_len + 10)
    assert report.records == 4 and report.kept == 2 and len(rows) == 2
    assert report.truncated_records == 1 and report.truncated_tokens > 0
    assert len(rows[1]["prompt_ids"]) + len(rows[1]["chosen_ids"]) == prompt_len + 10
    assert report.skipped_identical == 1 and report.skipped_long == 1
    assert report.skipped_origins == ["a:3", "a:4"]
    assert "1 with a reply cut" in report.describe("train") and "1 with chosen == rejected" in report.describe("train")


def test_rejected_to_first_difference_cuts_the_training_pairs_after_the_error_and_counts_them(sft_run, tmp_path,
                                                                                            tokenizer):
    """On the llama3 template: "donkey planet turtle" against "donkey rose turtle" is scored only to " planet"
    (no turn end after it), a run-on to its first extra token, a reply wrong from its first token to that token; the
    chosen replies and the eval pairs are never cut (their figures stay comparable with a run without the option)."""
    from data_formats import PreferencePair, write

    user = [{"role": "user", "content": "Sort the words alphabetically: turtle rose donkey"}]
    replies = ["donkey rose turtle", "donkey planet turtle", "donkey rose turtle donkey rose", "turtle"]
    pairs = [PreferencePair(user, [{"role": "assistant", "content": replies[0]}],
                            [{"role": "assistant", "content": rejected}], f"a:{i}", {})
             for i, rejected in enumerate(replies[1:])]
    write(pairs, tmp_path / "pairs.jsonl", to="preference")
    cfg = parse_args(DPORunConfig, ["--init", str(sft_run), "--data.train", str(tmp_path / "pairs.jsonl"),
                                    "--data.eval", str(tmp_path / "pairs.jsonl"), "--dpo.rejected_to_first_difference=true"])
    template = get_template("llama3", tokenizer)
    data = dpo.load_data(cfg, tokenizer, template).data
    whole = [split_pair(pair, template, tokenizer) for pair in pairs]
    chosen = whole[0][1]
    assert [tokenizer.decode(row["rejected_ids"]) for row in data.train] == [
        "donkey planet", "donkey rose turtle donkey", "turtle"]
    assert all(row["chosen_ids"] == chosen for row in data.train)
    assert [row["rejected_ids"] for row in data.eval] == [w[2] for w in whole]
    report = data.train_report
    assert report.rejected_cut_records == 3 and data.eval_report.rejected_cut_records == 0
    assert report.rejected_cut_tokens == sum(len(w[2]) for w in whole) - sum(len(r["rejected_ids"]) for r in data.train)
    assert "3 rejected replies scored only to their first token that differs" in report.describe("train data")


def test_a_prompt_whose_tokens_merge_into_the_reply_is_skipped_and_counted(tokenizer, monkeypatch):
    """Whole-text tokenisation can merge a prompt's last characters with a reply's first (the alpaca template's
    ``:`` + ``The`` on Llama 3's vocabulary). Then there is no one prompt for both replies: DPO skips the pair and
    counts it, rather than failing the run; the reward model, which needs no shared prompt, keeps it whole."""
    import finetune.templates
    from data_formats import PreferencePair
    from finetune.preference_data import tokenize_pairs_for_reward

    template = get_template("llama3", tokenizer)
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    pairs = [PreferencePair(user, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}],
                            "a:1", {})]
    monkeypatch.setattr(finetune.templates, "render_prompt", lambda *args, **kwargs: [0, 1, 2])  # not a prefix
    assert split_pair(pairs[0], template, tokenizer) is None
    rows, report = tokenize_pairs_for_dpo(pairs, template, tokenizer, max_length=64)
    assert rows == [] and report.skipped_boundary == 1 and report.skipped_records == 1
    assert report.skipped_origins == ["a:1"] and "1 whose prompt tokens merge" in report.describe("train")
    rows, report = tokenize_pairs_for_reward(pairs, template, tokenizer, max_length=64)
    assert report.kept == 1 and rows[0]["chosen_ids"] == finetune.templates.render(template, user + pairs[0].chosen,
                                                                                    tokenizer)[0]


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def run_recipe(argv):
    from finetune.config import DPORunConfig as Cfg

    return launch(Cfg, dpo.run, argv)


def test_missing_init_is_one_line_error(tmp_path, capsys):
    assert run_recipe(["--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dpo needs --init DIR") and err.count("\n") == 1


def test_init_that_is_not_a_run_is_one_line_error(tmp_path, capsys):
    assert run_recipe(["--init", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "r")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_recipe(["--init", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not a finished run" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_init_with_another_template_is_one_line_error(sft_run, tmp_path, capsys):
    assert run_recipe(["--init", str(sft_run), "--data.template=chatml", "--output_dir", str(tmp_path / "r")]) == 2
    assert "was trained with template 'llama3'" in capsys.readouterr().err


def test_non_preference_data_is_one_line_error(sft_run, tmp_path, capsys):
    code = run_recipe(["--init", str(sft_run), "--output_dir", str(tmp_path / "r"),
                       "--data.train=bundled:suite_messages_train.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "suite_messages_train.jsonl" in err and "preference" in err


def test_empty_reply_is_one_line_error_naming_the_record(sft_run, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
            "rejected": [{"role": "assistant", "content": "no"}]}
    bad = dict(good, rejected=[{"role": "assistant", "content": ""}])
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code = run_recipe(["--init", str(sft_run), "--output_dir", str(tmp_path / "r"), f"--data.train={data}"])
    err = capsys.readouterr().err
    assert code == 2 and "pairs.jsonl, line 2" in err and "rejected" in err


def test_identical_chosen_and_rejected_is_one_line_error_naming_the_record(sft_run, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    same = {"prompt": "hi", "chosen": "yo", "rejected": "yo"}
    data.write_text(json.dumps(same) + "\n")
    code = run_recipe(["--init", str(sft_run), "--output_dir", str(tmp_path / "r"), f"--data.train={data}"])
    err = capsys.readouterr().err
    assert code == 2 and "pairs.jsonl, line 1" in err and "different from chosen" in err


def test_dpo_config_checks():
    with pytest.raises(ConfigError, match="label_smoothing applies only"):
        DPOParams(loss="sigmoid", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"needs dpo.label_smoothing in \(0, 0.5\)"):
        DPOParams(loss="label_smoothed")
    with pytest.raises(ConfigError, match="dpo.nll_weight must be >= 0"):
        DPOParams(nll_weight=-1.0)
    with pytest.raises(ConfigError, match="dpo.loss must be one of"):
        DPOParams(loss="kto")
    with pytest.raises(ConfigError, match="adapter.method to lora or qlora"):
        parse_args(DPORunConfig, ["--init", "x", "--adapter.method=full"])
