"""Chat templates as data: the exact text of each conversation format, its trained spans, stop tokens and jinja.

A template turns a conversation (plain ``{"role", "content"}`` dicts: optional leading system, then user/assistant
alternating, starting with user) into text segments ``(text, trained)``. :func:`render` tokenises the segments one
at a time and concatenates them, so the boundary between a prompt and its reply is always a token boundary, and the
prompt that :func:`render_prompt` builds for generation is token for token the prefix the model was trained on.

Each template also carries a ``jinja`` chat template that renders the same text through transformers'
``apply_chat_template`` (with ``{% generation %}`` markers on the trained spans), so a saved model's tokenizer
formats chats exactly as training did (:func:`save_with_template`).

Templates: ``llama3``, ``llama2``, ``vicuna_v1.1``, ``alpaca``, ``chatml`` and ``tokenizer`` (the tokenizer's own
``chat_template``).
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from data_formats.canonical import Where, validate_messages

IGNORE_INDEX = -100
"""Label of a token that carries no loss (the value ``torch.nn.CrossEntropyLoss`` ignores)."""


class TemplateError(ValueError):
    """A conversation a template cannot render, an unknown template, or a tokenizer that lacks its tokens."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text, and whether its tokens are trained (carry a loss)."""

    text: str
    trained: bool


def _check_roles(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    """Raise ``data_formats.DataFormatError`` (a ``ValueError``) unless ``messages`` is a canonical conversation.

    The rules are data_formats' (:func:`data_formats.validate_messages`): an optional leading system message, then
    user/assistant alternating, starting with user, contents non-empty strings. A conversation to train on ends on an
    assistant turn; one to generate from (``add_generation_prompt=True``) ends on a user turn.
    """
    validate_messages(messages, Where("conversation"), ends_on="user" if add_generation_prompt else "assistant")


def _split_system(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours with the same ``trained`` flag and drop empty text, so each span is tokenised in one piece."""
    merged: list[Segment] = []
    for seg in segments:
        if not seg.text:
            continue
        if merged and merged[-1].trained == seg.trained:
            merged[-1] = Segment(merged[-1].text + seg.text, seg.trained)
        else:
            merged.append(seg)
    return merged


@dataclass(frozen=True)
class ChatTemplate(ABC):
    """A conversation format. Subclasses define :meth:`_segments`, :attr:`jinja` and :attr:`stop_strings`."""

    name: ClassVar[str]
    jinja: ClassVar[str]
    """A chat_template for transformers' ``apply_chat_template`` that renders exactly :meth:`text`."""

    def bind(self, tokenizer) -> ChatTemplate:
        """This template with the tokenizer's own BOS/EOS text where the format uses them (else itself)."""
        return self

    @property
    @abstractmethod
    def stop_strings(self) -> tuple[str, ...]:
        """The end-of-turn tokens: generation stops at the first of them."""

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as ``(text, trained)`` segments; neighbours with the same flag are merged."""
        _check_roles(messages, add_generation_prompt)
        return _merge(self._segments(messages, add_generation_prompt))

    def text(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The exact rendered string (the concatenation of :meth:`segments`)."""
        return "".join(seg.text for seg in self.segments(messages, add_generation_prompt))

    def encode(self, messages, tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``: each segment tokenised on its own, labels ``-100`` outside trained segments."""
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in self.segments(messages, add_generation_prompt):
            ids = tokenizer.encode(seg.text, add_special_tokens=False)
            input_ids += ids
            labels += ids if seg.trained else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    @abstractmethod
    def _segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        """The format's segments before merging (each subclass spells its own)."""


@dataclass(frozen=True)
class _EosTemplate(ChatTemplate):
    """A format that spells the model's BOS/EOS tokens (Llama 1/2-era models): they come from the tokenizer."""

    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def bind(self, tokenizer) -> ChatTemplate:
        if not tokenizer.eos_token:
            raise TemplateError(f"template {self.name!r} ends each reply with EOS, but the tokenizer has no eos_token")
        return dataclasses.replace(self, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.eos_token,)


# Meta Llama 3 Instruct. Source: meta-llama/llama3, llama/tokenizer.py, ChatFormat.encode_dialog_prompt (BOS, then
# per message a header and content.strip() + <|eot_id|>, then the assistant header), and the chat_template of
# Meta-Llama-3-8B-Instruct's tokenizer_config.json (``message['content'] | trim``).
@dataclass(frozen=True)
class Llama3Template(ChatTemplate):
    name: ClassVar[str] = "llama3"
    jinja: ClassVar[str] = r"""
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}
    {%- else -%}
        {{- message['content'] | trim + '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("<|eot_id|>", "<|end_of_text|>")

    def _segments(self, messages, add_generation_prompt):
        segs = [Segment("<|begin_of_text|>", False)]
        for m in messages:
            segs.append(Segment(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
            segs.append(Segment(m["content"].strip() + "<|eot_id|>", m["role"] == "assistant"))
        if add_generation_prompt:
            segs.append(Segment("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return segs


# Llama 2 chat. Source: meta-llama/llama, llama/generation.py, Llama.chat_completion: B_INST, E_INST = "[INST]",
# "[/INST]"; B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"; the system message is folded into the first user turn;
# each exchange is encode(f"{B_INST} {(prompt).strip()} {E_INST} {(answer).strip()} ", bos=True, eos=True) and the
# last user turn encode(f"{B_INST} {(prompt).strip()} {E_INST}", bos=True, eos=False). The same text as the
# chat_template of Llama-2-7b-chat-hf's tokenizer_config.json.
@dataclass(frozen=True)
class Llama2Template(_EosTemplate):
    name: ClassVar[str] = "llama2"
    jinja: ClassVar[str] = r"""
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {%- if loop.first and system_message is not none -%}
            {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] -%}
        {%- else -%}
            {%- set content = message['content'] -%}
        {%- endif -%}
        {{- bos_token -}}{{- '[INST] ' + content.strip() + ' [/INST]' -}}
    {%- else -%}
        {%- generation -%}{{- ' ' + message['content'].strip() + ' ' -}}{{- eos_token -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
"""

    def _segments(self, messages, add_generation_prompt):
        system, turns = _split_system(messages)
        segs = []
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content = m["content"]
                if i == 0 and system is not None:
                    content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
                segs.append(Segment(f"{self.bos_token}[INST] {content.strip()} [/INST]", False))
            else:
                segs.append(Segment(f" {m['content'].strip()} {self.eos_token}", True))
        return segs  # the generation prompt is the user turn itself: it ends in " [/INST]"


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


# Vicuna v1.1 (also v1.3, v1.5). Source: lm-sys/FastChat, fastchat/conversation.py, register_conv_template(
# Conversation(name="vicuna_v1.1", system_message=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"),
# sep_style=SeparatorStyle.ADD_COLON_TWO, sep=" ", sep2="</s>")) and Conversation.get_prompt for ADD_COLON_TWO:
# system + sep, then role + ": " + message + (sep, sep2)[i % 2] per message, and "ASSISTANT:" to prompt a reply.
# sep2 is the tokenizer's EOS, and the text starts with BOS, which FastChat's tokenizer call (train.py preprocess)
# prepends. The space after "ASSISTANT:" is trained with the reply: the generation prompt ends at "ASSISTANT:" as in
# get_prompt, and tokenizers attach that space to the reply's first word.
@dataclass(frozen=True)
class VicunaTemplate(_EosTemplate):
    name: ClassVar[str] = "vicuna_v1.1"
    jinja: ClassVar[str] = r"""
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions." -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}{{- system_message + ' ' -}}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' + message['content'] + ' ' -}}
    {%- else -%}
        {{- 'ASSISTANT:' -}}
        {%- generation -%}{{- ' ' + message['content'] -}}{{- eos_token -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""

    def _segments(self, messages, add_generation_prompt):
        system, turns = _split_system(messages)
        segs = [Segment(self.bos_token + (VICUNA_SYSTEM if system is None else system) + " ", False)]
        for m in turns:
            if m["role"] == "user":
                segs.append(Segment(f"USER: {m['content']} ", False))
            else:
                segs += [Segment("ASSISTANT:", False), Segment(f" {m['content']}{self.eos_token}", True)]
        if add_generation_prompt:
            segs.append(Segment("ASSISTANT:", False))
        return segs


# Stanford Alpaca. Source: tatsu-lab/stanford_alpaca, train.py: PROMPT_DICT["prompt_input"] / ["prompt_no_input"]
# (below, split into preamble and body), the target f"{example['output']}{tokenizer.eos_token}" appended directly
# (no separator), and BOS from the tokenizer call. Only the target is trained.
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class AlpacaTemplate(_EosTemplate):
    """Single turn. A user message ``instruction\\n\\ninput`` (how data_formats joins Alpaca's fields) uses the
    with-input prompt; a system message replaces the "Below is an instruction..." preamble."""

    name: ClassVar[str] = "alpaca"
    jinja: ClassVar[str] = r"""
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if loop_messages | length > 2 -%}
    {{- raise_exception('alpaca is a single-turn template: one user message, then at most one assistant reply') -}}
{%- endif -%}
{%- set parts = loop_messages[0]['content'].split('\n\n', 1) -%}
{%- if parts | length == 2 and parts[1] != '' -%}
    {%- set preamble = 'Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.' -%}
    {%- set body = '### Instruction:\n' + parts[0] + '\n\n### Input:\n' + parts[1] + '\n\n### Response:' -%}
{%- else -%}
    {%- set preamble = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -%}
    {%- set body = '### Instruction:\n' + loop_messages[0]['content'] + '\n\n### Response:' -%}
{%- endif -%}
{%- if system_message is not none -%}
    {%- set preamble = system_message -%}
{%- endif -%}
{{- bos_token -}}{{- preamble + '\n\n' + body -}}
{%- if loop_messages | length == 2 -%}
    {%- generation -%}{{- loop_messages[1]['content'] -}}{{- eos_token -}}{%- endgeneration -%}
{%- endif -%}
"""

    def _segments(self, messages, add_generation_prompt):
        system, turns = _split_system(messages)
        if len(turns) > 2:
            raise TemplateError(
                f"alpaca is a single-turn template (one user message, then one assistant reply); "
                f"got {sum(m['role'] == 'user' for m in turns)} user turns"
            )
        instruction, _, input_ = turns[0]["content"].partition("\n\n")
        if input_:
            preamble = ALPACA_PREAMBLE_INPUT
            body = f"### Instruction:\n{instruction}\n\n### Input:\n{input_}\n\n### Response:"
        else:
            preamble = ALPACA_PREAMBLE_NO_INPUT
            body = f"### Instruction:\n{turns[0]['content']}\n\n### Response:"
        segs = [Segment(f"{self.bos_token}{preamble if system is None else system}\n\n{body}", False)]
        if len(turns) == 2:
            segs.append(Segment(turns[1]["content"] + self.eos_token, True))
        return segs


# ChatML (OpenAI's format, as in Qwen and the common HF chatml chat_template): <|im_start|>{role}\n{content}<|im_end|>\n
@dataclass(frozen=True)
class ChatMLTemplate(ChatTemplate):
    name: ClassVar[str] = "chatml"
    jinja: ClassVar[str] = r"""
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}
    {%- else -%}
        {{- message['content'] + '<|im_end|>' -}}
    {%- endif -%}
    {{- '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("<|im_end|>",)

    def _segments(self, messages, add_generation_prompt):
        segs = []
        for m in messages:
            segs.append(Segment(f"<|im_start|>{m['role']}\n", False))
            segs.append(Segment(m["content"] + "<|im_end|>", m["role"] == "assistant"))
            segs.append(Segment("\n", False))
        if add_generation_prompt:
            segs.append(Segment("<|im_start|>assistant\n", False))
        return segs


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own ``chat_template``, through ``tokenizer.apply_chat_template``.

    Labels come from ``return_assistant_tokens_mask`` when the template has ``{% generation %}`` markers. Otherwise
    prefixes are rendered incrementally: the text between the conversation up to an assistant message (with the
    generation prompt) and the conversation including it is that message's span; whitespace after its last special
    token (the newline after ChatML's ``<|im_end|>``) is not trained.
    """

    name: ClassVar[str] = "tokenizer"
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError("template 'tokenizer' needs a tokenizer that has a chat_template; this one has none")

    def bind(self, tokenizer) -> ChatTemplate:
        return self if tokenizer is self.tokenizer else TokenizerTemplate(tokenizer)

    @property
    def jinja(self) -> str:  # type: ignore[override]
        return self.tokenizer.chat_template

    @property
    def has_generation_markers(self) -> bool:
        return bool(_GENERATION_TAG.search(self.jinja))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """EOS, and the special tokens that close an assistant turn (found by rendering a probe conversation)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        trained = "".join(s.text for s in self._segments(probe, False) if s.trained)
        closing = trained[trained.rfind("Hello") + len("Hello") :] if "Hello" in trained else trained
        found = sorted(
            ((closing.find(tok), tok) for tok in self._special_tokens() if tok in closing),
            key=lambda pair: pair[0],
        )
        stops = [tok for _, tok in found]
        if self.tokenizer.eos_token:
            stops.append(self.tokenizer.eos_token)
        return tuple(dict.fromkeys(stops))

    def encode(self, messages, tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        if not self.has_generation_markers:
            return super().encode(messages, tokenizer, add_generation_prompt)
        _check_roles(messages, add_generation_prompt)
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=self.jinja,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
        )
        input_ids = list(out["input_ids"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, out["assistant_masks"], strict=True)]
        return input_ids, labels

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.jinja, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _special_tokens(self) -> list[str]:
        added = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        return list(dict.fromkeys([*added, *self.tokenizer.all_special_tokens]))

    def _segments(self, messages, add_generation_prompt):
        segs: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], add_generation_prompt=True)
            full = self._apply(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"the tokenizer's chat_template does not render conversations as prefixes of longer ones "
                    f"(message {i}), so the assistant spans cannot be found; add {{% generation %}} markers to it "
                    f"or use a named template"
                )
            span = full[len(prompt) :]
            trained, tail = span, ""
            ends = [span.rfind(tok) + len(tok) for tok in self._special_tokens() if tok in span]
            if ends and not span[max(ends) :].strip():
                trained, tail = span[: max(ends)], span[max(ends) :]
            segs += [Segment(prompt[len(done) :], False), Segment(trained, True), Segment(tail, False)]
            done = full
        final = self._apply(messages, add_generation_prompt=add_generation_prompt)
        if not final.startswith(done):
            raise TemplateError("the tokenizer's chat_template renders the conversation's end inconsistently")
        segs.append(Segment(final[len(done) :], False))
        return segs


TEMPLATES: dict[str, type[ChatTemplate]] = {
    cls.name: cls
    for cls in (Llama3Template, Llama2Template, VicunaTemplate, AlpacaTemplate, ChatMLTemplate, TokenizerTemplate)
}
"""Every template by name."""


def template_class(name: str) -> type[ChatTemplate]:
    """The template class registered as ``name``; :class:`TemplateError` naming the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise TemplateError(f"unknown template {name!r}; expected one of {', '.join(TEMPLATES)}") from None


def get_template(template: str | ChatTemplate, tokenizer=None) -> ChatTemplate:
    """A template by name (bound to ``tokenizer``'s BOS/EOS when given), or ``template`` itself if not a name.

    An instance is returned as given, so a caller can pin BOS/EOS text (``Llama2Template(eos_token="</s>")``).
    """
    if isinstance(template, ChatTemplate):
        return template
    cls = template_class(template)
    if cls is TokenizerTemplate:
        return TokenizerTemplate(tokenizer)
    return cls() if tokenizer is None else cls().bind(tokenizer)


def _single_token_id(tokenizer, text: str, template: ChatTemplate) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise TemplateError(
            f"template {template.name!r} ends turns with {text!r}, which this tokenizer splits into {len(ids)} "
            f"tokens; add it as a special token or use a template made for this model"
        )
    return ids[0]


def stop_token_ids(template: str | ChatTemplate, tokenizer) -> list[int]:
    """The ids generation stops at: the template's end-of-turn tokens (each must be a single token)."""
    tpl = get_template(template, tokenizer)
    return list(dict.fromkeys(_single_token_id(tokenizer, s, tpl) for s in tpl.stop_strings))


def render(
    template: str | ChatTemplate, messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenise a conversation: ``(input_ids, labels)``, labels ``-100`` except on the assistant's replies.

    Trained: each assistant reply and its end-of-turn token (for llama3 ``{reply}<|eot_id|>``, not the assistant
    header). A conversation ends on an assistant turn, or on a user turn with ``add_generation_prompt=True`` (then
    the ids end with the assistant header, ready for generation, and no label is trained).

    Raises:
        ValueError: ``data_formats.DataFormatError`` for roles that break the rules (see :func:`_check_roles`);
            :class:`TemplateError` for an unknown template, a conversation the template cannot express (alpaca
            with several turns), or end-of-turn tokens the tokenizer would split.
    """
    tpl = get_template(template, tokenizer)
    stop_token_ids(tpl, tokenizer)  # a template whose end-of-turn token the tokenizer would split cannot train
    return tpl.encode(messages, tokenizer, add_generation_prompt)


def render_prompt(template: str | ChatTemplate, messages: list[dict[str, str]], tokenizer) -> list[int]:
    """The ids of a prompt for generation: ``messages`` (ending on a user turn) and the assistant header."""
    return render(template, messages, tokenizer, add_generation_prompt=True)[0]


def save_with_template(tokenizer, template: str | ChatTemplate, out_dir: str | Path, model_config=None) -> Path:
    """Save ``tokenizer`` with ``chat_template`` set to the template's jinja, and a ``generation_config.json``.

    The generation config's ``eos_token_id`` lists the template's stop tokens (and its bos/pad ids are the
    tokenizer's), so the saved model stops generating where it was trained to end a turn. Other generation settings
    come from ``model_config`` when given. The caller's tokenizer is left unchanged.
    """
    from transformers import GenerationConfig

    tpl = get_template(template, tokenizer)
    stops = stop_token_ids(tpl, tokenizer)
    out_dir = Path(out_dir)
    previous = tokenizer.chat_template
    tokenizer.chat_template = tpl.jinja
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.chat_template = previous
    config = GenerationConfig.from_model_config(model_config) if model_config is not None else GenerationConfig()
    config.eos_token_id = stops
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config.save_pretrained(out_dir)
    return out_dir


def trained_text(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """The trained spans decoded and concatenated in order (what a reader checks a template against)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return "".join(tokenizer.decode(run, skip_special_tokens=False) for run in runs)
