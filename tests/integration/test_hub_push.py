"""``finetune push`` and the model card, against a local stand-in for the hub (no network): which files would be
uploaded, through which two HfApi calls, and what the card says."""

import json

import yaml
from factories import make_run_dir

from finetune.cli import main
from finetune.export import export
from finetune.hub import LocalHub, files_to_push, push
from finetune.model_card import record_base_model
from finetune.run_dir import write_run_state


class RecordingApi:
    """What push asks of ``huggingface_hub.HfApi``: the calls and their arguments, nothing sent."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"


def dpo_after_sft(tmp_path):
    """An SFT run and a DPO run whose --init it is, each with run.json and summary.json as the scaffold leaves them."""
    sft = make_run_dir(tmp_path / "sft")
    write_run_state(sft, "sft", "running")
    write_run_state(sft, "sft", "finished", "adapter")
    dpo = make_run_dir(tmp_path / "dpo", seed=1)
    config = yaml.safe_load((dpo / "config.yaml").read_text())
    config["init"] = str(sft)
    config["data"]["train"] = "someone/preference-pairs"
    (dpo / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (dpo / "summary.json").write_text(json.dumps({"train_loss": 0.25, "eval_reward_accuracy": 0.75, "train_steps": 8,
                                                  "resolved_model": "/scratch/somewhere/tiny_base"}))
    (dpo / "checkpoint-8").mkdir()
    (dpo / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"x")
    (dpo / "runs").mkdir()
    (dpo / "runs" / "events.out.tfevents.1").write_bytes(b"x")
    (dpo / ".final-staging").mkdir()
    write_run_state(dpo, "dpo", "running")
    write_run_state(dpo, "dpo", "finished", "adapter")
    return sft, dpo


def test_push_a_run_uploads_its_model_files_and_a_card_naming_base_data_template_stops_stages_figures(tmp_path):
    sft, dpo = dpo_after_sft(tmp_path)
    api = RecordingApi()
    assert push(dpo, "me/tiny-dpo", api, private=True) == "commit"
    (create, repo, create_args), (upload, repo2, upload_args) = api.calls
    assert (create, repo, create_args["exist_ok"], create_args["private"]) == ("create_repo", "me/tiny-dpo", True, True)
    assert (upload, repo2, upload_args["folder_path"]) == ("upload_folder", "me/tiny-dpo", str(dpo))

    hub = LocalHub(tmp_path / "hub")
    push(dpo, "me/tiny-dpo", hub)
    uploaded = sorted(p.relative_to(hub.root / "me/tiny-dpo").as_posix() for p in (hub.root / "me/tiny-dpo").rglob("*")
                      if p.is_file())
    assert uploaded == files_to_push(dpo) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "config.yaml",
        "generation_config.json", "run.json", "summary.json", "tokenizer.json", "tokenizer_config.json"]
    card = (hub.root / "me/tiny-dpo" / "README.md").read_text()
    assert "[None]" not in card and "More Information Needed" not in card
    for text in ("| base model | `tiny` |", "`someone/preference-pairs`", "| chat template | `llama3` |",
                 "`<|eot_id|>`", f"`dpo ({dpo})` <- `sft ({sft})` <- `base tiny`", "| eval_reward_accuracy | 0.7500 |",
                 "| train_steps | 8 |", "library_name: peft", "- someone/preference-pairs"):
        assert text in card, text
    assert "/scratch/somewhere" not in card  # an absolute path says nothing on the hub


def test_exports_push_with_their_own_card_and_the_adapter_names_the_base_as_given(tmp_path):
    run = make_run_dir(tmp_path / "sft")
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"].startswith("/")  # what PEFT writes: the directory it loaded
    hub = LocalHub(tmp_path / "hub")
    for to, weights in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors"), ("gguf", "model.gguf")):
        out = export(run, to, tmp_path / f"sft-{to}")
        assert main(["push", str(out), "--repo_id", f"me/sft-{to}", "--to_dir", str(hub.root)]) == 0
        repo = hub.root / "me" / f"sft-{to}"
        assert (repo / weights).is_file() and (repo / "export_metadata.json").is_file()
        card = (repo / "README.md").read_text()
        assert f"export {to} ({out})" in card and "| stop tokens | `<|eot_id|>`, `<|end_of_text|>` |" in card
        assert "| base model | `tiny` |" in card
    assert json.loads((hub.root / "me/sft-adapter/adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert "library_name: transformers" in (hub.root / "me/sft-merged/README.md").read_text()
    assert "- gguf" in (hub.root / "me/sft-gguf/README.md").read_text()


def test_push_refuses_an_unfinished_run_and_a_bad_repo_id_in_one_line(tmp_path, capsys):
    run = make_run_dir(tmp_path / "sft")
    assert main(["push", str(run), "--repo_id", "no-owner", "--to_dir", str(tmp_path / "hub")]) == 2
    assert "is not a hub repository id" in capsys.readouterr().err
    write_run_state(run, "sft", "running")
    assert main(["push", str(run), "--repo_id", "me/x", "--to_dir", str(tmp_path / "hub")]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()


def test_every_adapter_config_names_the_base_as_given_and_peft_default_cards_go(tmp_path):
    for directory in (tmp_path, tmp_path / "value"):
        directory.mkdir(exist_ok=True)
        (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/scratch/tiny", "r": 8}))
        (directory / "README.md").write_text("This is a fine-tuned version of [None]. [More Information Needed]")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("the user's own notes")
    record_base_model(tmp_path, "meta-llama/Meta-Llama-3-8B")
    for directory in (tmp_path, tmp_path / "value"):
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config == {"base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "r": 8}
        assert not (directory / "README.md").exists()
    assert (tmp_path / "notes" / "README.md").read_text() == "the user's own notes"
