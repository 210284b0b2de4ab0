"""The model card's and the push's pure parts: what reads as a hub id, which figures a card lists, which files stay
behind."""

from finetune.hub import files_to_push
from finetune.model_card import flat_figures, is_hub_id


def test_hub_ids_are_owner_slash_name_and_not_local_paths(tmp_path):
    assert is_hub_id("meta-llama/Meta-Llama-3-8B") and is_hub_id("me/tiny-sft")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    for not_an_id in ("tiny", "./runs/sft", "/abs/dir", "~/x/y", "a/b/c", "owner/", str(tmp_path / "a" / "b"), None):
        assert not is_hub_id(not_an_id), not_an_id


def test_figures_flatten_nested_numbers_and_leave_out_lists_and_absolute_paths():
    summary = {"train_loss": 0.5, "eval": {"accuracy": 0.75, "kept": 3}, "model": "tiny", "curve": [1, 2],
               "resolved_model": "/scratch/tiny_base", "finished": True}
    assert flat_figures(summary) == [("train_loss", 0.5), ("eval.accuracy", 0.75), ("eval.kept", 3), ("model", "tiny"),
                                     ("finished", True)]


def test_checkpoints_events_rejects_and_staging_stay_behind(tmp_path):
    for name in ("README.md", "adapter_model.safetensors", "value/adapter_model.safetensors", "value/README.md",
                 "checkpoint-8/adapter_model.safetensors", "runs/x/events.out.tfevents.1", "rejects.jsonl",
                 ".final-staging/a", "training_args.bin", "loss.png", ".git/HEAD"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert files_to_push(tmp_path) == ["README.md", "adapter_model.safetensors", "loss.png",
                                       "value/adapter_model.safetensors"]
