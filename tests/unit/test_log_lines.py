"""Training log lines a person reads, and the eval points of ``loss.png``."""

from finetune.runs import eval_points, log_line


def test_a_training_row_is_one_readable_line():
    logs = {"loss": 6.7754, "grad_norm": 16.5612, "learning_rate": 0.002, "num_tokens": 1972.0, "epoch": 0.03846,
            "total_flos": 123.0}
    assert log_line(logs, 2, 6) == ("step 2/6  loss 6.775  grad_norm 16.56  learning_rate 2.00e-03  num_tokens 1972  "
                                    "epoch 0.03846")


def test_an_eval_row_drops_the_prefix_and_the_throughput():
    logs = {"eval_loss": 6.519, "eval_runtime": 0.2959, "eval_samples_per_second": 64.2, "epoch": 0.04}
    assert log_line(logs, 2, 6) == "step 2/6  eval  loss 6.519  runtime 0.30 s"


def test_the_last_row_says_how_long_training_took():
    logs = {"train_runtime": 3.087, "train_samples_per_second": 7.7, "train_loss": 5.8561, "epoch": 0.11}
    assert log_line(logs, 6, 6) == "done: 6 steps in 3.1 s  train_loss 5.856"
    assert log_line({"loss": 1.0}, 3, -1) == "step 3  loss 1"


def test_eval_points_come_from_the_trainer_and_the_stages_own_eval():
    """Trainer evaluations at steps 2 and 4; the stage measured 7.9 before training and 4.8 after step 6."""
    rows = [{"step": 2, "loss": 6.8}, {"step": 2, "eval_loss": 6.5}, {"step": 4, "eval_loss": 5.4},
            {"step": 6, "loss": 4.1}]
    summary = {"base_eval_loss": 7.9, "eval_loss": 4.8, "train_steps": 6}
    assert eval_points(rows, summary) == [(0, 7.9), (2, 6.5), (4, 5.4), (6, 4.8)]
    # without train.eval_steps the trainer never evaluates: the curve is still before -> after
    assert eval_points([r for r in rows if "eval_loss" not in r], summary) == [(0, 7.9), (6, 4.8)]
    # where the trainer evaluated the last step too, its figure is kept; no rows (no trainer ran here): no points
    assert eval_points([*rows, {"step": 6, "eval_loss": 4.7}], summary)[-1] == (6, 4.7)
    assert eval_points([], summary) == []
