"""``finetune chat``: one-shot ``--prompt`` and the interactive loop, on a run whose adapter was fitted to a short
conversation, so greedy replies are known and end on the template's stop token."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from factories import CONVERSATION, make_run_dir  # noqa: E402

from finetune import cli  # noqa: E402
from finetune.chat import ChatSession, load_chat_model  # noqa: E402
from finetune.generation import Decoding  # noqa: E402
from finetune.templates import render_prompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SYSTEM = CONVERSATION[0]["content"]
(FIRST, FIRST_REPLY), (SECOND, SECOND_REPLY) = [
    (CONVERSATION[i]["content"], CONVERSATION[i + 1]["content"]) for i in (1, 3)
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("chat") / "sft", seed=5, train_on=[CONVERSATION])


@pytest.fixture(scope="module")
def chat_model(run_dir):
    return load_chat_model(str(run_dir))


class RecordingGenerate:
    """Wraps ``model.generate`` to keep the prompt ids and the raw generated ids of every call."""

    def __init__(self, model):
        self.model, self.inner, self.calls = model, model.generate, []

    def __call__(self, input_ids, **kwargs):
        output = self.inner(input_ids=input_ids, **kwargs)
        self.calls.append((input_ids[0].tolist(), output[0, input_ids.shape[1] :].tolist()))
        return output


@pytest.fixture
def recorder(chat_model, monkeypatch):
    recording = RecordingGenerate(chat_model.model)
    monkeypatch.setattr(chat_model.model, "generate", recording)
    return recording


def test_prompt_mode_answers_once_and_stops_at_the_stop_token(run_dir, capsys):
    status = cli.main(["chat", str(run_dir), "--prompt", FIRST, "--system", SYSTEM, "--temperature", "0"])
    out = capsys.readouterr().out
    assert status == 0
    assert out == f"{FIRST_REPLY}\n"


def test_reply_ends_at_the_runs_stop_token(chat_model, recorder):
    session = ChatSession(chat_model, system=SYSTEM, sampling=Decoding(max_new_tokens=20, temperature=0.0))
    streamed = []
    completion = session.reply(FIRST, streamed.append)
    ((prompt, generated),) = recorder.calls
    eot = chat_model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert chat_model.stop_ids[0] == eot
    assert completion.stopped and completion.text == FIRST_REPLY == "".join(streamed)
    assert generated[len(completion.token_ids)] == eot  # the model produced <|eot_id|> and generation ended there
    assert len(generated) == len(completion.token_ids) + 1 < 20
    expected = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    assert prompt == render_prompt(chat_model.template, expected, chat_model.tokenizer)


def test_interactive_loop_keeps_history_resets_and_exits(chat_model, recorder, monkeypatch, capsys):
    import finetune.chat as chat

    session = ChatSession(chat_model, system=SYSTEM, sampling=Decoding(max_new_tokens=20, temperature=0.0))
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{FIRST}\n\n{SECOND}\n/reset\n/help\n{FIRST}\n/exit\nnever read\n"))
    chat.interactive(session)
    out = capsys.readouterr().out
    assert out.startswith(f"chatting with {chat_model.name} (template llama3)")
    assert out.count(f">>> {FIRST_REPLY}\n") == 2 and f">>> {SECOND_REPLY}\n" in out
    assert "(conversation cleared)" in out and "unknown command /help" in out
    assert len(recorder.calls) == 3  # the empty line and the commands generate nothing; /exit stops reading

    system = {"role": "system", "content": SYSTEM}
    first = {"role": "user", "content": FIRST}
    prompts = [prompt for prompt, _ in recorder.calls]
    template, tokenizer = chat_model.template, chat_model.tokenizer
    # the second turn sees the whole conversation rendered by the run's template, exactly as training rendered it
    assert prompts[1] == render_prompt(template, [system, *CONVERSATION[1:4]], tokenizer)
    assert prompts[2] == prompts[0] == render_prompt(template, [system, first], tokenizer)  # after /reset
    assert session.messages == CONVERSATION[1:3]


def test_end_of_input_quits(chat_model, monkeypatch, capsys):
    import finetune.chat as chat

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    chat.interactive(ChatSession(chat_model))
    assert capsys.readouterr().out.endswith(">>> \n")


def test_streaming_holds_back_partial_characters(chat_model):
    from finetune.chat import _ReplyStreamer

    tokenizer = chat_model.tokenizer
    ids = tokenizer.encode("é🙂 ok", add_special_tokens=False)
    pieces = []
    streamer = _ReplyStreamer(tokenizer, chat_model.stop_ids, pieces.append)
    streamer.put(torch.tensor([[1, 2]]))  # the prompt: not shown
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.put(torch.tensor([chat_model.stop_ids[0]]))
    streamer.put(torch.tensor([ids[0]]))  # after the stop token: not shown
    streamer.end()
    assert "".join(pieces) == "é🙂 ok" and all("\ufffd" not in p for p in pieces)


def test_tiny_by_name_and_bad_inputs(tmp_path, capsys):
    status = cli.main(["chat", "tiny", "--prompt", "Hi", "--max_new_tokens", "3", "--temperature", "0"])
    assert status == 0 and capsys.readouterr().out.endswith("\n")
    status = cli.main(["chat", str(tmp_path), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "neither a PEFT adapter" in err and err.count("\n") == 1


def test_chat_with_a_merged_export_uses_the_recorded_template(run_dir, tmp_path, capsys):
    from finetune.export import export

    merged = export(run_dir, "merged", tmp_path / "merged", dtype="float32")
    status = cli.main(["chat", str(merged), "--prompt", FIRST, "--system", SYSTEM, "--temperature", "0"])
    assert status == 0 and capsys.readouterr().out == f"{FIRST_REPLY}\n"
    assert load_chat_model(str(merged)).template.name == "llama3"
