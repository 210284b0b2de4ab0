"""``finetune eval``: lm-eval's HF backend on the run with the bundled offline task, the verifier suite and
held-out loss, one table and one JSON."""

import json
import sys

import pytest
import torch
from factories import make_run_dir

from finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("eval") / "sft")


def two_choice_accuracy(model, tokenizer, docs) -> float:
    """The bundled task scored by hand: the right answer wins when its summed log-probability after the prompt (joined
    by a space, the task's target_delimiter; the whole text tokenised, as lm-eval does) beats the wrong one's."""

    def logprob(context: str, continuation: str) -> float:
        whole = tokenizer(context + continuation).input_ids
        start = len(tokenizer(context).input_ids)
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
        return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))

    wins = [logprob(d["prompt"], " " + d["answer"]) > logprob(d["prompt"], " " + d["wrong"]) for d in docs]
    return sum(wins) / len(wins)


def test_eval_prints_one_table_and_writes_the_json_lm_eval_scoring_as_worked_by_hand(run, capsys):
    pytest.importorskip("lm_eval")
    from finetune.chat import load_chat_model
    from finetune.lm_eval_tasks.suite_data import load
    from finetune.model_card import write_model_card

    write_model_card(run)
    argv = ["eval", str(run), "--limit", "12", "--num_samples", "4", "--max_new_tokens", "8", "--no_chat_template"]
    assert main(argv) == 0
    out = run / "eval.json"  # a directory's figures go beside it, and into its card
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    lm_eval = report["lm_eval"]["finetune_suite"]
    assert lm_eval["num_docs"] == 12
    chat = load_chat_model(str(run))
    assert lm_eval["acc"] == pytest.approx(two_choice_accuracy(chat.model, chat.tokenizer, load()["test"].select(range(12))))
    suite = report["suite"]
    assert suite["data"] == "bundled:suite_messages_eval.jsonl" and suite["verifier"] == "finetune.suite:verify"
    assert suite["verifier_prompts"] == 4
    assert suite["verifier_accuracy"] == sum(s["correct"] for s in suite["samples"]) / 4
    assert suite["eval_loss"] > 0 and suite["eval_loss_rows"] == 200
    for line in (f"finetune_suite acc    {lm_eval['acc']:.4f}  lm-eval, 12 docs",
                 f"verifier accuracy     {suite['verifier_accuracy']:.4f}  4 prompts",
                 f"held-out loss         {suite['eval_loss']:.4f}  200 conversations"):
        assert line in table, table
    card = (run / "README.md").read_text()
    assert f"| finetune_eval.finetune_suite.acc | {lm_eval['acc']:.4f} |" in card
    assert f"| finetune_eval.verifier_accuracy | {suite['verifier_accuracy']:.4f} |" in card


def test_without_lm_eval_a_task_is_a_one_line_error_and_tasks_none_runs_our_suite(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    assert main(["eval", str(run), "--num_samples", "2", "--out", str(tmp_path / "a.json")]) == 2
    assert "pip install 'finetune[eval]'" in capsys.readouterr().err
    assert main(["eval", str(run), "--tasks", "none", "--num_samples", "2", "--max_new_tokens", "4",
                 "--out", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert "lm_eval" not in report and report["suite"]["verifier_prompts"] == 2
