"""What DPO scores of a rejected reply with ``dpo.rejected_to_first_difference``: the tokens up to and including the
first one that differs from the chosen reply (hand-worked token ids; the stage itself: tests/integration/test_dpo.py),
and the losses it is refused for."""

import pytest

from finetune.config import ConfigError, DPORunConfig, parse_args
from finetune.preference_data import cut_rejected, first_difference

EOT = 2


def test_a_wrong_middle_word_is_kept_and_the_right_words_after_it_are_not():
    chosen, rejected = [5, 6, 7, EOT], [5, 9, 7, EOT]  # "donkey rose turtle" / "donkey planet turtle"
    assert first_difference(chosen, rejected) == 1 and cut_rejected(chosen, rejected) == [5, 9]


def test_a_run_on_keeps_its_first_token_past_the_chosen_reply():
    chosen, rejected = [5, 6, 7, EOT], [5, 6, 7, 8, 5, 6, EOT]  # the right answer, then more words
    assert first_difference(chosen, rejected) == 3 and cut_rejected(chosen, rejected) == [5, 6, 7, 8]


def test_a_reply_wrong_from_its_first_token_keeps_that_token_alone():
    assert cut_rejected([5, 6, EOT], [7, 6, EOT]) == [7]


def test_a_reply_that_stops_early_is_already_its_own_first_difference():
    chosen, rejected = [5, 6, 7, EOT], [5, EOT]  # stops after one word: the turn end is the error
    assert cut_rejected(chosen, rejected) == rejected


def test_a_rejected_reply_that_is_a_prefix_of_the_chosen_one_is_left_whole():
    assert first_difference([5, 6, 7], [5, 6]) == 2 and cut_rejected([5, 6, 7], [5, 6]) == [5, 6]


@pytest.mark.parametrize("loss", ["ipo", "orpo", "simpo"])
def test_a_per_token_mean_loss_refuses_the_cut_in_one_line(loss):
    """With a per-token mean the tokens the replies share no longer cancel: a cut rejected reply would score like its
    prefix, which the chosen reply shares (ORPO and SimPO with it lost 0.5 and 1.5 points on the bundled pairs)."""
    extra = {"orpo": ["--dpo.nll_weight=1"], "simpo": ["--dpo.beta=2"]}.get(loss, [])
    argv = ["--init", "runs/sft", f"--dpo.loss={loss}", *extra, "--dpo.rejected_to_first_difference=true"]
    with pytest.raises(ConfigError, match=f"sums a reply's log-probs .*dpo.loss={loss} averages them per token"):
        parse_args(DPORunConfig, argv)


@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_a_summed_loss_takes_the_cut(loss):
    cfg = parse_args(DPORunConfig, ["--init", "runs/sft", f"--dpo.loss={loss}", "--dpo.rejected_to_first_difference=true"])
    assert cfg.dpo.rejected_to_first_difference
