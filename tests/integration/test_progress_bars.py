"""A progress bar wherever a person waits on generation or an export: the bar's description and its count reach
stderr (tqdm), the results are the same as without it."""

import pytest
from factories import make_run_dir

from finetune.config import ModelConfig
from finetune.export import export
from finetune.generation import Decoding, generate
from finetune.models import load_base_model

pytestmark = pytest.mark.usefixtures("one_thread")


def bar_text(capsys) -> str:
    return capsys.readouterr().err.replace("\r", "\n")


def test_generation_shows_a_bar_only_when_asked(tokenizer, capsys):
    model = load_base_model(ModelConfig(), for_training=False).eval()
    prompts = [[tokenizer.bos_token_id, 5 + i] for i in range(5)]
    greedy = Decoding(max_new_tokens=3)
    capsys.readouterr()  # loading the model has its own bar
    quiet = generate(model, tokenizer, prompts, [tokenizer.eos_token_id], greedy, batch_size=2)
    assert bar_text(capsys) == ""
    shown = generate(model, tokenizer, prompts, [tokenizer.eos_token_id], greedy, batch_size=2,
                     progress="verifier accuracy")
    text = bar_text(capsys)
    assert "verifier accuracy:" in text and "/5 [" in text and "seq/s" in text  # counted in sequences, of 5
    assert [c.token_ids for c in shown] == [c.token_ids for c in quiet]


def test_merged_and_gguf_exports_show_their_progress(tmp_path, capsys):
    pytest.importorskip("gguf")
    run = make_run_dir(tmp_path / "run")
    export(run, "merged", tmp_path / "merged", dtype="float32")
    assert "Unloading and merging model" in bar_text(capsys)  # PEFT's merge bar, then transformers' writing bar
    export(run, "gguf", tmp_path / "gguf", dtype="f32")
    text = bar_text(capsys)
    assert "GGUF f32: converting" in text and "Writing" in text  # ours, then gguf's bar over the bytes written
