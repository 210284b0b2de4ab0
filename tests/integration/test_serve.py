"""``finetune serve`` on loopback, asked through the ``openai`` client: one plain and one streamed chat completion,
each ending at the run's stop token (its text not in the reply) and equal to ``finetune chat``'s greedy answer."""

from pathlib import Path

import pytest
from factories import CONVERSATION, free_port, make_run_dir

from finetune.chat import ChatSession, load_chat_model
from finetune.generation import Decoding

openai = pytest.importorskip("openai")
SYSTEM, QUESTION = CONVERSATION[0]["content"], CONVERSATION[1]["content"]
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("serve") / "sft", seed=5, train_on=[CONVERSATION])


@pytest.fixture(scope="module")
def greedy(run_dir):
    """``finetune chat``'s greedy reply to the question, and whether it ended on a stop token."""
    session = ChatSession(load_chat_model(str(run_dir)), system=SYSTEM, sampling=Decoding(max_new_tokens=20))
    completion = session.reply(QUESTION)
    assert completion.stopped and completion.text
    return completion


def ask_both_ways(server) -> tuple:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.model]
    plain = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=20,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return plain, streamed, finish


def test_transformers_server_answers_as_finetune_chat_does_and_stops_at_the_stop_token(run_dir, greedy):
    from finetune.serve import start

    server = start(run_dir, port=free_port(), device="cpu")
    merged = Path(server.model)
    try:
        assert server.backend == "transformers" and merged.is_dir()  # the adapter, merged into the base once
        plain, streamed, finish = ask_both_ways(server)
    finally:
        server.stop()
    assert not merged.exists()  # the temporary merged model goes with the server
    with pytest.raises(openai.APIConnectionError):  # and the server's process with it
        openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0).models.list()
    reply = plain.choices[0].message.content
    assert reply == streamed == greedy.text
    assert "<|eot_id|>" not in reply and "<|end_of_text|>" not in reply
    assert plain.choices[0].finish_reason == "stop" and finish == ["stop"]
    # The stop token was generated (one more token than the reply's), not cut by max_tokens.
    assert plain.usage.completion_tokens == len(greedy.token_ids) + 1 < 20


def test_llama_cpp_server_serves_the_gguf_export_with_its_template_and_stop_token(run_dir, greedy, tmp_path):
    pytest.importorskip("llama_cpp.server")
    from finetune.export import export
    from finetune.serve import start

    gguf = export(run_dir, "gguf", tmp_path / "sft-gguf", dtype="f32")
    server = start(gguf, port=free_port())
    try:
        assert server.backend == "llama.cpp" and server.model == "sft-gguf"
        plain, streamed, finish = ask_both_ways(server)
    finally:
        server.stop()
    reply = plain.choices[0].message.content
    assert reply == streamed == greedy.text and "<|eot_id|>" not in reply
    assert plain.choices[0].finish_reason == "stop" and finish == ["stop"]


def test_nothing_to_serve_is_a_one_line_error(tmp_path, capsys):
    from finetune.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such run, export or GGUF" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "holds neither a PEFT adapter" in capsys.readouterr().err


def test_a_server_that_stops_before_it_answers_is_a_one_line_error():
    from finetune.serve import ServeError, _wait_until_up

    with pytest.raises(ServeError, match="stopped before it answered"):
        _wait_until_up(f"http://127.0.0.1:{free_port()}/v1/models", timeout=30, alive=lambda: False)
