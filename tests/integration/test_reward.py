"""recipes/reward.py on the tiny model: what the run leaves, the score API reproducing the run's figures, TRL's loss
being Bradley-Terry, starting from an SFT adapter, and bad input."""

import json
from pathlib import Path

import pytest
import recipe_runs
import torch
from recipe_runs import assert_run_directory
from torch.testing import assert_close

from finetune.config import AdapterConfig, ConfigError, RewardRunConfig, SFTRunConfig, parse_args
from finetune.data import load_preferences
from finetune.losses import bradley_terry_loss
from finetune.models import load_tokenizer, lora_config, resolve_model
from finetune.preference_data import tokenize_pairs_for_reward
from finetune.runs import write_config
from finetune.templates import get_template

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "reward.py"
EVAL = "bundled:suite_preference_eval.jsonl"

QUICK = [
    "--data.max_train_samples=64",
    "--data.max_eval_samples=16",
    "--train.max_steps=4",
    "--train.per_device_batch_size=4",
    "--train.logging_steps=2",
    "--train.save_steps=2",
    "--train.save_total_limit=10",
]


def run_recipe(argv):
    return recipe_runs.run_recipe("reward", RewardRunConfig, argv)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "run"
    assert run_recipe(["--output_dir", str(out), *QUICK]) == 0
    return out


def test_run_directory_contents(finished_run):
    out = finished_run
    assert_run_directory(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4]
    for r in step_rows:
        assert r["loss"] > 0 and r["tokens_per_second"] > 0 and 0 <= r["accuracy"] <= 1 and "margin" in r
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_margin", "init_eval_accuracy"):
        assert isinstance(summary[key], float), key
    assert summary["train_data"]["records"] == 64 and summary["train_data"]["skipped_records"] == 0
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((c / "checkpoint_complete.json").is_file() for c in checkpoints)


def test_saved_adapter_holds_lora_and_the_scalar_head(finished_run):
    from safetensors import safe_open

    config = json.loads((finished_run / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    with safe_open(finished_run / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        head = [k for k in keys if k.endswith("score.weight")]
        assert head and f.get_tensor(head[0]).shape == (1, 128)
    assert any("lora_A" in k for k in keys)


def test_score_api_reproduces_the_run_eval_figures(finished_run):
    """load_reward_model + score, on the eval pairs rendered as conversations, gives the accuracy and margin the run
    wrote to summary.json (so the scorer renders and reads the head exactly as training did)."""
    from finetune.reward_model import load_reward_model

    summary = json.loads((finished_run / "summary.json").read_text())
    rm = load_reward_model(finished_run)
    pairs = load_preferences(EVAL, limit=16)
    chosen = torch.tensor(rm.score([p.prompt + p.chosen for p in pairs]))
    rejected = torch.tensor(rm.score([p.prompt + p.rejected for p in pairs], batch_size=3))
    losses, accuracy = bradley_terry_loss(chosen, rejected)
    assert accuracy.item() == pytest.approx(summary["eval_accuracy"])
    assert (chosen - rejected).mean().item() == pytest.approx(summary["eval_margin"], abs=1e-5)
    assert losses.mean().item() == pytest.approx(summary["eval_loss"], abs=1e-5)


def test_score_accepts_text_and_conversation_objects(finished_run):
    from data_formats import Conversation
    from finetune.reward_model import load_reward_model

    rm = load_reward_model(finished_run)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    text = rm.template.text(messages)
    by_messages, by_object, by_text = rm.score([messages, Conversation(messages), text])
    assert isinstance(by_messages, float)
    assert by_object == by_messages
    assert by_text == pytest.approx(by_messages, abs=1e-5)


def test_refuses_non_empty_output_dir(finished_run, capsys):
    assert run_recipe(["--output_dir", str(finished_run), *QUICK]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# The loss, and starting from an SFT run


def make_sft_run(directory, seed=0):
    """What recipes/sft.py leaves: config.yaml and a LoRA adapter (B made non-zero so it differs from the base)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")),
                           lora_config(AdapterConfig(r=8, alpha=16)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    write_config(directory, SFTRunConfig(output_dir=str(directory)))
    return model


def test_init_from_sft_copies_its_adapter_and_trl_loss_is_bradley_terry(tmp_path):
    """The reward adapter starts as the SFT adapter (shape and weights, on the sequence-classifier backbone), and
    TRL's RewardTrainer loss on a batch equals finetune.losses.bradley_terry_loss of the head's scores."""
    from datasets import Dataset
    from trl import RewardTrainer

    from finetune.run_dir import resolve_init
    from finetune.stages import reward

    sft = make_sft_run(tmp_path / "sft")
    cfg = parse_args(RewardRunConfig, ["--init", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "rm")])
    cfg, init, changed = resolve_init(cfg)
    kind = init.kind
    assert kind == "adapter" and cfg.adapter.r == 8 and cfg.adapter.alpha == 16 and changed == ["r", "alpha"]
    model = reward.load_reward_backbone(cfg, kind)
    sft_weights = {n.replace(".default", ""): p for n, p in sft.named_parameters() if "lora_" in n}
    copied = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert sft_weights.keys() == copied.keys()
    for name, value in sft_weights.items():
        assert torch.equal(value, copied[name]), name
    assert any("score" in n and p.requires_grad for n, p in model.named_parameters())

    tokenizer = load_tokenizer("tiny")
    rows, _ = tokenize_pairs_for_reward(load_preferences(EVAL, limit=4), get_template("llama3", tokenizer), tokenizer, 512)
    trainer = RewardTrainer(model=model, args=reward.trl_arguments(cfg, tmp_path / "rm", False),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen, rejected = scores.chunk(2)
    losses, _ = bradley_terry_loss(chosen, rejected)
    assert_close(trl_loss, losses.mean())


def test_qlora_reward_model_trains_and_scores(tmp_path):
    """adapter.method=qlora: a 4-bit backbone, the head kept in the compute dtype; it trains, saves and scores."""
    from bitsandbytes.nn import Linear4bit

    from finetune.reward_model import load_reward_model

    out = tmp_path / "rm"
    argv = ["--output_dir", str(out), "--adapter.method=qlora", "--data.max_train_samples=16",
            "--data.max_eval_samples=8", "--train.max_steps=2", "--train.logging_steps=1", "--train.save_steps=2"]
    assert run_recipe(argv) == 0
    rm = load_reward_model(out)
    assert isinstance(rm.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    summary = json.loads((out / "summary.json").read_text())
    pairs = load_preferences(EVAL, limit=8)
    chosen = torch.tensor(rm.score([p.prompt + p.chosen for p in pairs]))
    rejected = torch.tensor(rm.score([p.prompt + p.rejected for p in pairs]))
    assert (chosen > rejected).float().mean().item() == pytest.approx(summary["eval_accuracy"])


# --------------------------------------------------------------------------------------------------------------------
# Bad input


def test_pairs_that_cannot_be_scored_are_counted_skips():
    from data_formats import PreferencePair

    tokenizer = load_tokenizer("tiny")
    template = get_template("llama3", tokenizer)
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pairs = [
        PreferencePair(user, reply("4"), reply("5"), "p:1", {}),
        PreferencePair(user, reply("4"), reply("4"), "p:2", {}),
        PreferencePair(user, reply("4 " * 50), reply("5"), "p:3", {}),
    ]
    rows, report = tokenize_pairs_for_reward(pairs, template, tokenizer, max_length=40)
    assert len(rows) == 1 and report.kept == 1
    assert report.skipped_identical == 1 and report.skipped_long == 1 and report.skipped_origins == ["p:2", "p:3"]
    assert report.truncated_records == 0  # a reward sequence is never cut: its score is read at the last token


def test_conversation_data_is_one_line_error(tmp_path, capsys):
    code = run_recipe(["--output_dir", str(tmp_path / "r"), "--data.train=bundled:suite_messages_train.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "preference" in err
    assert not (tmp_path / "r").exists()


def test_bad_init_is_one_line_error(tmp_path, capsys):
    assert run_recipe(["--output_dir", str(tmp_path / "r"), "--init", str(tmp_path / "missing")]) == 2
    assert "--init" in capsys.readouterr().err


def test_reward_config_checks():
    with pytest.raises(ConfigError, match="LoRA adapter and a scalar head"):
        parse_args(RewardRunConfig, ["--adapter.method=full"])


def test_reward_model_scorer_on_a_reward_run_equals_its_score_api(tmp_path):
    """RewardModelScorer.from_run wraps finetune.reward_model.load_reward_model: the same numbers as its score()."""
    from factories import make_reward_run

    from finetune.reward_model import load_reward_model
    from finetune.scorers import RewardModelScorer, Sample

    SAMPLES = [Sample([{"role": "user", "content": q}], response, i)
               for i, (q, response) in enumerate([("What is 2 + 3?", "5"), ("What is 2 + 3?", "6"),
                                                   ("Reverse the words: a b", "b a")])]
    run = make_reward_run(tmp_path / "reward")
    scorer = RewardModelScorer.from_run(str(run))
    expected = load_reward_model(run).score([s.conversation() for s in SAMPLES])
    assert scorer(SAMPLES) == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) == 3


# --------------------------------------------------------------------------------------------------------------------
# Empty replies: a model's is scored, a data file's is refused

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
EMPTY_TEXT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>")


def test_a_models_empty_reply_is_scored_by_the_score_api_the_scorer_and_the_gates_win_rate(tmp_path):
    """A model may answer nothing: rejection sampling's scorer and the pipeline gate's win rate score that answer
    (the template with an empty reply, read at the end-of-turn token) instead of stopping the run."""
    from factories import make_reward_run

    from finetune.pipeline import reward_scores, win_rate
    from finetune.reward_model import load_reward_model
    from finetune.scorers import RewardModelScorer, Sample

    run = make_reward_run(tmp_path / "reward")
    rm = load_reward_model(run)
    empty, blank, answer, as_text = rm.score([[*PROMPT, {"role": "assistant", "content": ""}],
                                              [*PROMPT, {"role": "assistant", "content": " \n"}],
                                              [*PROMPT, {"role": "assistant", "content": "5"}], EMPTY_TEXT])
    assert isinstance(empty, float) and empty == blank  # llama3 strips a reply, so a blank one renders as empty
    assert empty == pytest.approx(as_text, abs=1e-5) and empty != answer
    samples = [Sample(PROMPT, "", 0), Sample(PROMPT, "5", 1)]
    assert RewardModelScorer(rm)(samples) == pytest.approx([empty, answer], abs=1e-5)

    def answers(*replies):
        return {"answers": [[*PROMPT, {"role": "assistant", "content": r}] for r in replies]}

    candidate, incumbent = reward_scores(run, answers("", "5"), answers("5", ""))
    assert candidate == pytest.approx([empty, answer], abs=1e-5) and incumbent == pytest.approx([answer, empty], abs=1e-5)
    assert win_rate(candidate, incumbent) == 0.5


def test_an_empty_reply_in_the_reward_data_is_a_one_line_error(tmp_path, capsys):
    """A user's pair with an empty reply is still refused before anything is written, naming file, record, field."""
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": [{"role": "assistant", "content": "6"}]}
    pairs.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": [{"role": "assistant", "content": ""}]})
                     + "\n")
    code = run_recipe(["--output_dir", str(tmp_path / "r"), f"--data.train={pairs}", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(pairs) in err and "line 2" in err and "chosen" in err and "non-empty assistant reply" in err
    assert not (tmp_path / "r").exists()
