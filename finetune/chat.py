"""``finetune chat``: talk to a run, a merged model or ``tiny`` with the template and stop tokens it was trained with.

    finetune chat runs/sft                                   # interactive; /reset clears, /exit quits
    finetune chat runs/sft --prompt "What is 12 + 30?"       # answer once and exit (scripts, tests)
    finetune chat exports/sft-merged --system "Be terse." --temperature 0

A run directory loads its base with the adapter merged in, and its chat template from ``config.yaml``; a model
directory (a merged export) uses the template its ``export_metadata.json`` records, else its tokenizer's
``chat_template``; a model name (``tiny``, a hub id) uses ``--template`` (default: its tokenizer's own, else llama3).
Every turn renders the whole conversation through :func:`finetune.templates.render_prompt`, exactly as training
rendered it, and generation stops at the template's stop tokens; the reply is printed as it is generated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .generation import Completion, Decoding, cut_at_stop


@dataclass
class ChatModel:
    """A model ready to chat: weights, tokenizer, chat template and the ids that end a reply."""

    model: object
    tokenizer: object
    template: object
    stop_ids: list[int]
    name: str
    """What was loaded, for the banner."""


def load_chat_model(name_or_dir: str, template: str | None = None) -> ChatModel:
    """Load a run directory, a model directory or a model name (see the module docstring)."""
    import torch

    from .export import inspect_run, load_model, load_tokenizer_and_template

    if Path(name_or_dir).is_dir():
        source = inspect_run(name_or_dir, template)
        tokenizer, tpl, stops = load_tokenizer_and_template(source)
        model = load_model(source)
    else:
        from transformers import AutoModelForCausalLM

        from .models import load_tokenizer, resolve_model
        from .templates import get_template, stop_token_ids

        tokenizer = load_tokenizer(name_or_dir)
        tpl = get_template(template or ("tokenizer" if tokenizer.chat_template else "llama3"), tokenizer)
        stops = stop_token_ids(tpl, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_dir), dtype="auto").eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return ChatModel(model, tokenizer, tpl, stops, str(name_or_dir))


class _ReplyStreamer:
    """Receives generated ids from ``model.generate`` and hands printable text to ``on_text`` as it grows.

    The first ``put`` is the prompt (skipped). Nothing at or after a stop token is shown, and a trailing partial UTF-8
    character (decoded as U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, stop_ids: list[int], on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.stops = set(stop_ids)
        self.on_text = on_text
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped or token in self.stops:
                self.stopped = True
                return
            self.ids.append(token)
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text


def stream_reply(
    chat: ChatModel, prompt_ids: list[int], sampling: Decoding, on_text: Callable[[str], None]
) -> Completion:
    """Generate one reply to ``prompt_ids`` with a KV cache, streaming its text; stops at the template's stop ids."""
    import torch

    model, tokenizer = chat.model, chat.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else chat.stop_ids[0]
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=list(chat.stop_ids), pad_token_id=pad_id)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    streamer = _ReplyStreamer(tokenizer, chat.stop_ids, on_text)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, use_cache=True, **kwargs
        )
    return cut_at_stop(output[0, len(prompt_ids) :].tolist(), chat.stop_ids, pad_id, tokenizer)


@dataclass
class ChatSession:
    """A conversation: the history so far, rendered through the template on every turn."""

    chat: ChatModel
    system: str | None = None
    sampling: Decoding = field(default_factory=Decoding)
    messages: list[dict[str, str]] = field(default_factory=list)
    """The turns so far (user and assistant alternating; the system message is added when rendering)."""

    def reset(self) -> None:
        self.messages = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """The ids the model sees for the next reply: system, history, the new user turn, the assistant header.

        The oldest exchanges are dropped while the prompt and the reply would not fit the model's context.
        """
        from .templates import render_prompt

        limit = getattr(self.chat.model.config, "max_position_embeddings", None)
        history = list(self.messages)
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = render_prompt(
                self.chat.template, [*head, *history, {"role": "user", "content": user_text}], self.chat.tokenizer
            )
            if limit is None or len(ids) + self.sampling.max_new_tokens <= limit or not history:
                return ids
            history = history[2:]

    def reply(self, user_text: str, on_text: Callable[[str], None] = lambda text: None) -> Completion:
        """Answer ``user_text`` (streaming through ``on_text``) and add the exchange to the history.

        An empty reply is not added (a conversation turn must have content), so the next turn starts afresh.
        """
        completion = stream_reply(self.chat, self.prompt_ids(user_text), self.sampling, on_text)
        reply = completion.text.strip()
        if reply:
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
        return completion


HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"


def interactive(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None):
    """The terminal loop: read a line, stream the reply; ``/reset``, ``/exit``; end of input quits."""

    def out(text: str) -> None:
        (write or _stdout)(text)

    out(f"chatting with {session.chat.name} (template {session.chat.template.name}); {HELP}\n")
    while True:
        try:
            line = read(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            out("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        try:
            completion = session.reply(line, out)
        except KeyboardInterrupt:
            out("\n(interrupted; that exchange is not kept)\n")
            continue
        if not completion.text.strip():
            out("(empty reply; not kept in the conversation)")
        elif not completion.stopped:
            out(" [...]")  # hit --max_new_tokens before a stop token
        out("\n")


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``finetune chat``'s arguments."""
    parser.add_argument("model", help="a run directory, a model directory (e.g. a merged export), or a model name")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--system", default=None, help="a system message for the conversation")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default 0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling when temperature > 0")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply in tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--template", default=None, help="chat template (default: the run's or the model's own)")


def run(args: argparse.Namespace) -> int:
    """Run ``finetune chat``; a user error prints ``error: ...`` and returns 2."""
    from .export import ExportError
    from .templates import TemplateError

    if args.max_new_tokens <= 0 or args.temperature < 0:
        print("error: --max_new_tokens must be positive and --temperature 0 or more", file=sys.stderr)
        return 2
    try:
        chat = load_chat_model(args.model, args.template)
    except (ExportError, TemplateError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sampling = Decoding(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    session = ChatSession(chat, system=args.system, sampling=sampling)
    if args.prompt is not None:
        if not args.prompt.strip():
            print("error: --prompt is empty", file=sys.stderr)
            return 2
        session.reply(args.prompt, _stdout)
        _stdout("\n")
        return 0
    interactive(session)
    return 0
