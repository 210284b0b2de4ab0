"""PPO on one base with four adapters (finetune.stages.ppo): the roles and their switching, the reward adapter scoring
like the reward run, the rollout layout, and a two-iteration run on the tiny model in which the policy and the value
head train while the reference stays the SFT model. Stand-in SFT and reward runs (random non-zero LoRA adapters
saved like the recipes save them) keep these to seconds."""

import json
import math

import pytest
import torch
from factories import QUICK, make_reward_run  # noqa: E402
from torch.testing import assert_close

from finetune.config import ConfigError, PPORunConfig, parse_args
from finetune.data import load_conversations
from finetune.models import resolve_model
from finetune.prompts import prompt_schedule
from finetune.rollout import build_rollout
from finetune.stages import ppo
from finetune.templates import get_template

EVAL = "bundled:suite_messages_eval.jsonl"






@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from factories import make_sft_run

    return make_sft_run(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    return make_reward_run(tmp_path_factory.mktemp("reward"))




def ppo_config(tmp_path, sft_run, *extra):
    return parse_args(PPORunConfig, ["--init", str(sft_run), "--output_dir", str(tmp_path / "ppo"), *QUICK, *extra])


def sft_model(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    return PeftModel.from_pretrained(base, str(sft_run)).eval()


def rollout_batch(tokenizer, n=3):
    """A few eval prompts with their reference replies as responses, laid out as a PPO rollout."""
    template = get_template("llama3", tokenizer)
    convs = load_conversations(EVAL, limit=n)
    from finetune.templates import render_prompt

    prompt_ids = [render_prompt(template, c.messages[:-1], tokenizer) for c in convs]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    responses = [tokenizer.encode(c.messages[-1]["content"], add_special_tokens=False) + [eot] for c in convs]
    return build_rollout(prompt_ids, responses, tokenizer.pad_token_id), prompt_ids, responses


def reference_logprobs(model, rollout):
    """Per-token log-probs of the response tokens from full logits (an independent path from the stage's)."""
    from finetune.logprobs import token_logprobs

    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    return token_logprobs(logits[:, :-1], rollout.labels) * rollout.mask


def test_rollout_layout_marks_exactly_the_response_tokens(tokenizer):
    rollout, prompt_ids, responses = rollout_batch(tokenizer)
    for row, (p, r) in enumerate(zip(prompt_ids, responses)):
        positions = rollout.mask[row].nonzero().squeeze(-1)
        # Position t scores token t + 1: the first response token is scored at len(prompt) - 1.
        assert positions.tolist() == list(range(len(p) - 1, len(p) + len(r) - 1))
        assert rollout.labels[row][rollout.mask[row]].tolist() == r
        assert (rollout.labels[row][~rollout.mask[row]] == -100).all()
        assert rollout.attention_mask[row].sum() == len(p) + len(r)


def test_prompt_schedule_covers_every_prompt_once_per_pass():
    batches = [prompt_schedule(10, i, 4, seed=3) for i in range(5)]  # 20 prompts drawn = two passes over 10
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:], "each pass is reshuffled"
    assert prompt_schedule(10, 2, 4, seed=3) == batches[2]


def test_four_roles_are_adapters_on_one_base(tmp_path, sft_run, reward_run):
    from safetensors.torch import load_file

    cfg = ppo.resolve_init(ppo_config(tmp_path, sft_run, f"--score.reward_model={reward_run}"))
    roles = ppo.load_roles(cfg)
    model = roles.model
    assert set(model.peft_config) == {ppo.POLICY, ppo.REFERENCE, ppo.VALUE, ppo.REWARD}
    from transformers import AutoModelForCausalLM

    base_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    plain = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    assert base_numel == sum(p.numel() for p in plain.parameters()), "one copy of the base, not four"
    # Whichever role is active, only the policy and value adapters (and the value head) train.
    for role in (ppo.POLICY, ppo.REFERENCE, ppo.VALUE, ppo.REWARD):
        roles.use(role)
        trainable = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {ppo.POLICY, ppo.VALUE}, role
    assert roles.value_head.weight.requires_grad and not roles.reward_head.weight.requires_grad
    # Policy and reference start as the SFT adapter; value and reward as the reward run's adapter and head.
    params = dict(model.named_parameters())
    policy = {n: p for n, p in params.items() if f".{ppo.POLICY}." in n}
    for name, p in policy.items():
        assert torch.equal(p, params[name.replace(f".{ppo.POLICY}.", f".{ppo.REFERENCE}.")])
    saved = load_file(reward_run / "adapter_model.safetensors")
    assert torch.equal(roles.reward_head.weight, saved["base_model.model.score.weight"])
    assert torch.equal(roles.value_head.weight, roles.reward_head.weight)
    key = next(k for k in saved if "lora_B" in k)
    assert torch.equal(params[key.replace("lora_B.weight", f"lora_B.{ppo.REWARD}.weight")], saved[key])


def test_reward_adapter_on_the_shared_base_scores_like_the_reward_run(tmp_path, sft_run, reward_run, tokenizer):
    """The reward role (adapter + head on the causal-LM base, left-padded batches) gives the scores
    finetune.reward_model.load_reward_model gives (a separate sequence classifier, right-padded)."""
    from finetune.reward_model import load_reward_model

    cfg = ppo.resolve_init(ppo_config(tmp_path, sft_run, f"--score.reward_model={reward_run}"))
    roles = ppo.load_roles(cfg)
    conversations = [c.messages for c in load_conversations(EVAL, limit=5)]
    conversations.append([*conversations[0][:-1], {"role": "assistant", "content": ""}])  # a policy may answer nothing
    shared = ppo.AdapterRewardModel(roles, tokenizer, get_template("llama3", tokenizer)).score(conversations, batch_size=3)
    separate = load_reward_model(reward_run).score(conversations)
    assert_close(torch.tensor(shared), torch.tensor(separate), atol=1e-4, rtol=1e-4)
    assert len({round(s, 4) for s in separate}) == 6
    assert model_active(roles) == ppo.POLICY, "scoring switches back to the policy"


def model_active(roles):
    return roles.model.active_adapter


def test_rollout_logprobs_equal_the_update_forward_before_a_step(tmp_path, sft_run, tokenizer):
    """Dropout is off, so the no-grad rollout log-probs and the training forward's agree: the first ratio is 1.
    Values come from the value adapter, reference log-probs equal the SFT model's."""
    roles = ppo.load_roles(ppo.resolve_init(ppo_config(tmp_path, sft_run)))
    rollout, _, _ = rollout_batch(tokenizer)
    weight = roles.model.get_base_model().get_output_embeddings().weight
    ppo.score_rollout(roles, rollout, weight, temperature=1.0, batch_size=2)
    hidden, values = ppo.PolicyAndValue(roles)(rollout.input_ids, rollout.attention_mask)
    logprobs = ppo.policy_logprobs(hidden, weight, rollout.labels, 1.0)
    assert logprobs.requires_grad
    assert_close(logprobs.detach() * rollout.mask, rollout.logprobs * rollout.mask)
    assert_close(values[:, :-1].detach(), rollout.values)
    assert_close(rollout.ref_logprobs * rollout.mask, reference_logprobs(sft_model(sft_run), rollout), atol=1e-4, rtol=1e-4)
    assert (rollout.values == 0).all(), "without a reward model the value head starts at zero"


def test_top_k_rollout_logprobs_are_over_the_sampled_support(tmp_path, sft_run, tokenizer):
    """With top-k sampling the policy is the softmax over each position's k largest logits. The rollout's support is
    that top k (the sampled token swapped in for the k-th where a tie put it outside), its log-probs equal the full
    tempered logits' with every other token masked, the update forward gives the same (ratio 1), and the
    reference, still the SFT model, gives the same on the same support (KL 0)."""
    from finetune.logprobs import token_logprobs

    roles = ppo.load_roles(ppo.resolve_init(ppo_config(tmp_path, sft_run)))
    rollout, _, _ = rollout_batch(tokenizer)
    weight = roles.model.get_base_model().get_output_embeddings().weight
    ppo.score_rollout(roles, rollout, weight, temperature=0.7, batch_size=2, top_k=5)
    mask = rollout.mask

    with torch.no_grad():
        logits = sft_model(sft_run)(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, :-1]
    top = (logits / 0.7).topk(5, dim=-1).indices
    outside_top = mask & ~(top == rollout.labels.unsqueeze(-1)).any(-1)
    top[outside_top, -1] = rollout.labels[outside_top]
    assert outside_top.any(), "the stand-in SFT model ranks some reply tokens below its top 5"
    assert torch.equal(rollout.support[mask], top[mask])
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top, False)
    expected = token_logprobs((logits / 0.7).masked_fill(outside, float("-inf")), rollout.labels.masked_fill(~mask, -100))
    assert_close(rollout.logprobs * mask, expected * mask, atol=1e-4, rtol=1e-4)
    assert_close(rollout.ref_logprobs * mask, rollout.logprobs * mask)

    hidden, _ = ppo.PolicyAndValue(roles)(rollout.input_ids, rollout.attention_mask)
    logprobs = ppo.policy_logprobs(hidden, weight, rollout.labels, 0.7, rollout.support)
    assert_close(logprobs.detach() * mask, rollout.logprobs * mask)
    entropy = ppo.response_entropy(hidden.detach(), weight, mask, 0.7, rollout.support)
    assert 0 < entropy < math.log(5) + 1e-6


def test_top_k_run_starts_at_the_reference(tmp_path, sft_run):
    """A top-k PPO run (the config check lets top_k through, not top_p): at the first iteration the policy and the
    reference agree on every support, so the KL is 0, and the run finishes."""
    cfg = ppo_config(tmp_path, sft_run, "--sampling.top_k=5", "--sampling.temperature=0.7", "--ppo.num_iterations=1",
                     "--ppo.ppo_epochs=1", "--score.verifier=toy_verifiers:short_answer", "--eval.before_training=false")
    summary, _ = ppo.train(cfg)
    row = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-5) and 0 < row["entropy"] < math.log(5) + 1e-6
    assert "eval_accuracy" in summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sft_run):
    """Two PPO iterations on the tiny model, rewarded by short_answer; returns (output dir, summary, roles)."""
    out = tmp_path_factory.mktemp("ppo")
    cfg = parse_args(PPORunConfig, ["--init", str(sft_run), "--output_dir", str(out / "run"), *QUICK,
                                 "--ppo.num_iterations=2", "--score.verifier=toy_verifiers:short_answer"])
    summary, roles = ppo.train(cfg)
    return out / "run", summary, roles


def test_run_logs_every_iteration_and_writes_the_run_directory(trained):
    out, summary, _ = trained
    for name in ("config.yaml", "metrics.jsonl", "rollouts.jsonl", "summary.json", "adapter_model.safetensors",
                 "adapter_config.json", "tokenizer.json", "generation_config.json", "loss.png",
                 "value/adapter_model.safetensors", "value/value_head.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # TensorBoard as transformers' TensorBoardCallback writes it for SFT and DPO: runs/<date>_<host>/, train/<key>.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = out.glob("runs/*/events.out.tfevents.*")
    board = EventAccumulator(str(events.parent))
    board.Reload()
    assert set(board.Tags()["scalars"]) == {f"train/{k}" for k in rows[0] if k != "step"}
    assert [(e.step, e.value) for e in board.Scalars("train/kl")] == [(r["step"], pytest.approx(r["kl"])) for r in rows]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("score", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy", "response_length",
                    "learning_rate", "loss", "kl_coef", "approx_kl", "tokens_per_second"):
            assert isinstance(row[key], float) and row[key] == row[key], key
        assert row["optimizer_steps"] % 4 == 0  # 8 responses / minibatch 4 x 2 epochs per iteration
        assert 0 <= row["clip_fraction"] <= 1 and row["entropy"] > 0 and row["value_loss"] > 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5), "the first rollout comes from the SFT policy itself"
    # ppo.save_every (10) > iterations: the only checkpoint is the one after the last iteration, complete.
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert rows[1]["kl"] != 0.0
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 4 * 2 and {r["iteration"] for r in rollouts} == {1, 2}
    saved = json.loads((out / "summary.json").read_text())
    for key in ("init_eval_accuracy", "eval_accuracy", "final_score", "final_kl"):
        assert key in saved, key


def test_policy_trains_reference_stays_the_sft_model(trained, sft_run, tokenizer):
    from safetensors.torch import load_file

    out, _, roles = trained
    rollout, _, _ = rollout_batch(tokenizer)
    sft = reference_logprobs(sft_model(sft_run), rollout)
    roles.use(ppo.REFERENCE)
    reference = reference_logprobs(roles.model, rollout)
    roles.use(ppo.POLICY)
    policy = reference_logprobs(roles.model, rollout)
    assert_close(reference, sft, atol=1e-4, rtol=1e-4)
    assert (policy - sft).abs().max() > 1e-3, "the policy adapter moved"
    # The saved policy adapter is the trained one, loadable as a run's adapter; the init's is untouched.
    before = load_file(sft_run / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max() for k in before) > 0
    assert_close(reference_logprobs(sft_model(out), rollout), policy, atol=1e-4, rtol=1e-4)


def test_value_head_trains(trained):
    out, _, roles = trained
    from safetensors.torch import load_file

    head = load_file(out / "value" / "value_head.safetensors")["weight"]
    assert head.abs().sum() > 0, "the value head started at zero and was trained"
    assert torch.equal(head, roles.value_head.weight.detach())


def test_qlora_one_iteration(tmp_path, sft_run):
    """The one base in 4-bit NF4 (bitsandbytes on CPU), with top-k rollouts as the tiny QLoRA config samples: the
    four roles still switch and the policy still trains."""
    import bitsandbytes as bnb

    cfg = parse_args(PPORunConfig, ["--init", str(sft_run), "--output_dir", str(tmp_path / "q"), *QUICK,
                                 "--adapter.method=qlora", "--ppo.num_iterations=1", "--ppo.ppo_epochs=1",
                                 "--sampling.top_k=5", "--score.verifier=toy_verifiers:short_answer",
                                 "--eval.before_training=false"])
    summary, roles = ppo.train(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in roles.model.modules())
    row = json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-5) and row["value_loss"] > 0
    policy = {n: p for n, p in roles.model.named_parameters() if f".{ppo.POLICY}." in n}
    reference = dict(roles.model.named_parameters())
    assert any(not torch.equal(p, reference[n.replace(f".{ppo.POLICY}.", f".{ppo.REFERENCE}.")]) for n, p in policy.items())
    assert "eval_accuracy" in summary


def test_config_errors_are_one_line(tmp_path, sft_run, capsys):
    from finetune.launch import launch

    with pytest.raises(ConfigError, match="ppo needs --init"):
        parse_args(PPORunConfig, [])
    with pytest.raises(ConfigError, match="top_p=1"):
        parse_args(PPORunConfig, ["--init", "x", "--sampling.top_p=0.9"])
    with pytest.raises(ConfigError, match="no such directory"):
        ppo.resolve_init(parse_args(PPORunConfig, ["--init", str(tmp_path / "missing")]))
    with pytest.raises(ConfigError, match="not a finished run"):
        ppo.resolve_init(parse_args(PPORunConfig, ["--init", str(sft_run), f"--score.reward_model={tmp_path}"]))
    assert launch(PPORunConfig, lambda cfg: ppo.run(cfg), ["--init", str(tmp_path / "missing")]) == 2
    assert "error: --init" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ppo.save_every=0 writes none"):
        parse_args(PPORunConfig, ["--init", "x", "--resume", "--ppo.save_every=0"])
    with pytest.raises(ConfigError, match="holds no run to resume"):
        ppo.train(ppo_config(tmp_path, sft_run, "--resume"))


def test_response_entropy_equals_the_full_logits_entropy(tmp_path, sft_run, tokenizer):
    """The stage's entropy (chunked, from hidden states, response tokens only) equals the entropy of the full
    tempered logits averaged over the response tokens; a minibatch without response tokens gives 0, not NaN."""
    from finetune.logprobs import entropy_from_logits

    roles = ppo.load_roles(ppo.resolve_init(ppo_config(tmp_path, sft_run)))
    rollout, _, _ = rollout_batch(tokenizer)
    weight = roles.model.get_base_model().get_output_embeddings().weight
    with torch.no_grad():
        hidden, _ = ppo.PolicyAndValue(roles)(rollout.input_ids, rollout.attention_mask)
        full = entropy_from_logits(hidden[:, :-1] @ weight.t() / 0.7)
        assert_close(ppo.response_entropy(hidden, weight, rollout.mask, 0.7), full[rollout.mask].mean())
        assert ppo.response_entropy(hidden, weight, torch.zeros_like(rollout.mask), 0.7) == 0


def test_full_weights_sft_run_is_the_base_and_the_reference(tmp_path, tokenizer, reward_run):
    """From a full fine-tune the SFT model is the base: policy, reference and value are new adapters on it, the
    reference's stays zero (the SFT model itself), and the run records that base so export finds it."""
    from factories import make_full_sft_run
    from transformers import AutoModelForCausalLM

    from finetune.run_dir import RunDir

    full = make_full_sft_run(tmp_path / "sft_full", noise=0.3)
    cfg = parse_args(PPORunConfig, ["--init", str(full), "--output_dir", str(tmp_path / "ppo"), *QUICK,
                                 "--adapter.r=4", "--ppo.num_iterations=1", "--score.verifier=toy_verifiers:short_answer",
                                 "--eval.before_training=false"])
    summary, roles = ppo.train(cfg)
    rollout, _, _ = rollout_batch(tokenizer)
    sft = reference_logprobs(AutoModelForCausalLM.from_pretrained(full).eval(), rollout)
    roles.use(ppo.REFERENCE)
    assert_close(reference_logprobs(roles.model, rollout), sft, atol=1e-4, rtol=1e-4)
    roles.use(ppo.POLICY)
    assert (reference_logprobs(roles.model, rollout) - sft).abs().max() > 1e-3, "the policy adapter moved"
    row = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-5), "the first rollout comes from the SFT model itself"
    saved = RunDir.read(tmp_path / "ppo").config
    assert saved["model"]["name"] == str(full) and saved["adapter"]["r"] == 4
    assert "eval_accuracy" in summary
    # A reward adapter trained on the original base cannot share this one.
    with pytest.raises(ConfigError, match="cannot share this base"):
        ppo.resolve_init(parse_args(PPORunConfig, ["--init", str(full), f"--score.reward_model={reward_run}"]))
