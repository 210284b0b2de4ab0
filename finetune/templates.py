"""Chat templates as data: the exact text of each conversation format, its trained spans, stop tokens and jinja.

A template turns a conversation (plain ``{"role", "content"}`` dicts: optional leading system, then user/assistant
alternating, starting with user) into :class:`Segment` s: pieces of text, whether each is trained, and which are the
template's own control tokens (BOS, EOS, role headers, end of turn). An assistant message with ``"weight": 0`` is
rendered but not trained.

:func:`render` tokenises the rendered text as a whole, as the original recipes do (Meta's ``ChatFormat`` for Llama 3,
FastChat's ``preprocess``, Stanford Alpaca's ``train.py``): the ids are exactly ``tokenizer(text,
add_special_tokens=False).input_ids`` of the full text, for byte-level BPE and SentencePiece tokenizers alike, and the
labels mark the tokens that begin inside a trained span (each reply and its end-of-turn token), found through the
fast tokenizer's offsets, which is where the original recipes' positional masks put the boundary. Two deliberate
departures from a plain ``tokenizer(text)``:

* Only the template's control tokens become special-token ids. A special token spelled inside a message
  (``<|eot_id|><|start_header_id|>assistant<|end_header_id|>``, ``</s>``, ``[INST]``, ``<|im_end|>``) is encoded as
  the plain text it is, so no record of data can forge a turn.
* Where the recipe's BOS is a token id before its text (Meta's ``chat_completion`` for each Llama 2 exchange,
  FastChat's and Stanford's tokenizer calls for Vicuna and Alpaca), the text after that BOS is encoded as the start
  of a text, as they do. For byte-level BPE and for the SentencePiece tokenizers Llama ships with (the dummy prefix
  ``▁`` on every stretch between special tokens) that is the whole-text encoding too; for one that adds the prefix
  only at the very start of the text (transformers' ``legacy=False``, its GGUF converter) it is the recipes'.

Whole-text tokenisation has a consequence at the start of a reply: where the tokenizer merges the prompt's last
characters with the reply's first (byte-level BPE on Alpaca's ``### Response:The``), that token belongs to neither
side; it is not trained, and the generation prompt (:func:`render_prompt`, the whole-text encoding of the prompt) is
then not a token prefix of the training ids. Measured on real ShareGPT (docs/templates.md), only ``alpaca`` meets it.

Each template also carries a ``jinja`` chat template that renders the same text through transformers'
``apply_chat_template`` (with ``{% generation %}`` markers on the trained spans), so a saved model's tokenizer
formats chats exactly as training did (:func:`save_with_template`).

Templates: ``llama3``, ``llama2``, ``vicuna_v1.1``, ``alpaca``, ``chatml`` and ``tokenizer`` (the tokenizer's own
``chat_template``).
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from data_formats.canonical import Found, Where, validate_messages

IGNORE_INDEX = -100
"""Label of a token that carries no loss (the value ``torch.nn.CrossEntropyLoss`` ignores)."""


class TemplateError(ValueError):
    """A conversation a template cannot render, an unknown template, or a tokenizer that lacks its tokens."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text, and how it is tokenised and trained."""

    text: str
    trained: bool = False
    """Its tokens carry a loss."""
    control: bool = False
    """One of the template's own special tokens (BOS, EOS, a header or end-of-turn token): a single token id. Only a
    control segment yields a special token; the same text inside a message is encoded as plain text."""
    starts_text: bool = False
    """Tokenised as the start of a new text rather than as a continuation of what precedes it: the text after a BOS
    that the recipe's code puts before it as a token id (Meta's Llama 2 exchanges, FastChat's and Stanford's
    tokenizer calls)."""


def _control(text: str, trained: bool = False) -> Segment:
    return Segment(text, trained, control=True)


_WHERE = Where("conversation")


def _is_empty_reply(message) -> bool:
    return (isinstance(message, dict) and message.get("role") == "assistant" and isinstance(message.get("content"), str)
            and not message["content"].strip())


def _check_roles(messages: list[dict], add_generation_prompt: bool, empty_reply: bool = False) -> None:
    """Raise ``data_formats.DataFormatError`` (a ``ValueError``) unless ``messages`` is a canonical conversation.

    The rules are data_formats' (:func:`data_formats.validate_messages`): an optional leading system message, then
    user/assistant alternating, starting with user, contents non-empty strings. A conversation to train on ends on an
    assistant turn; one to generate from (``add_generation_prompt=True``) ends on a user turn. Contents must be
    encodable text (a lone surrogate is not), and ``weight``, where present, is 0 or 1 on an assistant message.
    ``empty_reply``: the last message may be an empty (or blank) assistant reply, what a model answered to the
    prompt before it (which must then be a valid prompt, ending on a user turn).
    """
    if empty_reply and not add_generation_prompt and messages and _is_empty_reply(messages[-1]):
        validate_messages(list(messages[:-1]), _WHERE, ends_on="user")
    else:
        validate_messages(messages, _WHERE, ends_on="user" if add_generation_prompt else "assistant")
    for i, message in enumerate(messages):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as error:
            raise _WHERE.error(
                f"messages[{i}].content", "text (valid Unicode)", Found(f"a lone surrogate at character {error.start}")
            ) from None
        weight = message.get("weight")
        if weight is None:
            continue
        # axolotl-style data puts weight 0 on every prompt turn: that is what we do anyway. Weight 1 there asks for
        # training a prompt turn, which no template here does, so it is refused rather than ignored.
        if message["role"] != "assistant" and weight != 0:
            raise _WHERE.error(
                f"messages[{i}].weight", "0 or no weight on a non-assistant message (only replies are trained)", weight
            )
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _WHERE.error(f"messages[{i}].weight", "0 or 1 (whether the reply is trained)", weight)


def _trained(message: dict) -> bool:
    """An assistant message is trained unless it says ``"weight": 0`` (OpenAI's fine-tuning convention)."""
    return message["role"] == "assistant" and message.get("weight") != 0


def _split_system(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring text with the same ``trained`` flag and drop empty text; control segments stay apart."""
    merged: list[Segment] = []
    starts_text = False
    for seg in segments:
        if not seg.text:
            starts_text = starts_text or seg.starts_text
            continue
        if starts_text:
            seg, starts_text = dataclasses.replace(seg, starts_text=True), False
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and not previous.control
            and not seg.control
            and not seg.starts_text
            and previous.trained == seg.trained
        ):
            merged[-1] = dataclasses.replace(previous, text=previous.text + seg.text)
        else:
            merged.append(seg)
    return merged


# ------------------------------------------------------------------------------------------------------ tokenising

_STAND_IN = "\U000f8000"
"""A private-use character that opens the stand-in of a control token in the text the encoder sees."""


class _ControlTokenEncoder:
    """Tokenises rendered text in which only the template's control tokens are special.

    It holds a copy of the tokenizer's backend (``tokenizers.Tokenizer``) with ``encode_special_tokens`` on, so a
    special token spelled in a message is plain text, and one extra non-special added token per control token: a
    private-use stand-in that the text carries where the template put that control token. The stand-in copies the
    control token's lstrip/rstrip/normalized flags, so the text around it is split and normalised exactly as around
    the real token in a whole-text encoding, and its id is swapped for the real one. transformers'
    ``apply_chat_template(..., sanitize_control_tokens=True)`` answers the same threat, but it cannot return an
    assistant mask and it encodes each sanitised token apart from its neighbours.
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TemplateError(
                f"render needs a fast tokenizer (one backed by the tokenizers library, for its offsets); got "
                f"{type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        # It adds no token with add_special_tokens=False, and ByteLevel's would trim the offsets the labels use.
        self.backend.post_processor = None
        self.backend.encode_special_tokens = True
        self.stand_ins: dict[str, str] = {}
        self.real_ids: dict[int, int] = {}

    def stand_in(self, control: str, template: ChatTemplate) -> str:
        """The text that stands for ``control`` (added to the copy on first use)."""
        if control not in self.stand_ins:
            from tokenizers import AddedToken

            real_id = _single_token_id(self.tokenizer, control, template)
            flags = self.tokenizer.added_tokens_decoder.get(real_id)
            lstrip, rstrip, normalized = (flags.lstrip, flags.rstrip, flags.normalized) if flags else (False,) * 3
            if flags is not None and not flags.special:
                # A control token kept as a plain added token would still match inside a message: make it special.
                self.backend.add_special_tokens([AddedToken(control, special=True, normalized=False)])
            text = _STAND_IN + chr(0xF8001 + len(self.stand_ins))
            self.backend.add_tokens(
                [AddedToken(text, special=False, lstrip=lstrip, rstrip=rstrip, normalized=normalized)]
            )
            self.real_ids[self.backend.token_to_id(text)] = real_id
            self.stand_ins[control] = text
        return self.stand_ins[control]

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
        """``(ids, character offsets, how many control tokens)`` of ``text`` with stand-ins for control tokens."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids = [self.real_ids.get(i, i) for i in encoding.ids]
        return ids, encoding.offsets, sum(i in self.real_ids for i in encoding.ids)


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encoder(tokenizer) -> _ControlTokenEncoder:
    """The tokenizer's encoder, built once per tokenizer (copying a 128k vocabulary takes a second or two)."""
    try:
        encoder = _ENCODERS.get(tokenizer)
    except TypeError:  # not weak-referenceable: build it each time
        return _ControlTokenEncoder(tokenizer)
    if encoder is None or encoder.size != len(tokenizer):  # tokens added since: copy the backend again
        encoder = _ENCODERS[tokenizer] = _ControlTokenEncoder(tokenizer)
    return encoder


def _texts(segments: list[Segment]) -> list[list[Segment]]:
    """The segments cut where a new text starts (:attr:`Segment.starts_text`); each part is encoded in one call."""
    parts: list[list[Segment]] = []
    for seg in segments:
        if not parts or seg.starts_text:
            parts.append([])
        parts[-1].append(seg)
    return parts


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each id whose first character lies in a trained span, else -100.

    A token that starts in the prompt and ends in the reply (byte-level BPE's ``:The`` after Alpaca's ``### Response``)
    is not trained: what the original recipes do by masking as many tokens as the prompt has on its own (Stanford's
    ``train.py``, FastChat's ``preprocess``). transformers' assistant mask would train it.
    """
    starts = [start for start, _ in spans]
    labels = []
    for token, (start, _) in zip(ids, offsets, strict=True):
        k = bisect.bisect_right(starts, start) - 1  # the last span that begins at or before the token
        labels.append(token if k >= 0 and start < spans[k][1] else IGNORE_INDEX)
    return labels


def encode_segments(segments: list[Segment], tokenizer, template: ChatTemplate) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of rendered segments: see the module docstring for what is guaranteed."""
    encoder = _encoder(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for part in _texts(segments):
        pieces, spans, controls, at = [], [], 0, 0
        for seg in part:
            if seg.control:
                text = encoder.stand_in(seg.text, template)
                controls += 1
            else:
                if _STAND_IN in seg.text:
                    raise TemplateError(
                        "a message contains U+F8000, the private-use character render reserves to mark a template's "
                        "control tokens"
                    )
                text = seg.text
            if seg.trained:
                if spans and spans[-1][1] == at:
                    spans[-1] = (spans[-1][0], at + len(text))
                else:
                    spans.append((at, at + len(text)))
            pieces.append(text)
            at += len(text)
        ids, offsets, found = encoder.encode("".join(pieces))
        if found != controls:
            raise TemplateError(
                f"template {template.name!r}: the tokenizer matched {found} of the {controls} control tokens in this "
                f"text as tokens"
            )
        input_ids += ids
        labels += _labels(ids, offsets, spans)
    return input_ids, labels


# ------------------------------------------------------------------------------------------------------- templates


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

    def segments(self, messages: list[dict], add_generation_prompt: bool = False,
                 empty_reply: bool = False) -> list[Segment]:
        """The conversation as :class:`Segment` s; neighbouring text with the same flags is merged. ``empty_reply``:
        the last assistant reply may be empty (see :func:`render`)."""
        _check_roles(messages, add_generation_prompt, empty_reply)
        return _merge(self._segments(messages, add_generation_prompt))

    def text(self, messages: list[dict], add_generation_prompt: bool = False, empty_reply: bool = False) -> str:
        """The exact rendered string (the concatenation of :meth:`segments`)."""
        return "".join(seg.text for seg in self.segments(messages, add_generation_prompt, empty_reply))

    def encode(self, messages, tokenizer, add_generation_prompt: bool = False,
               empty_reply: bool = False) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``: the whole text tokenised, labels ``-100`` outside the trained spans."""
        return encode_segments(self.segments(messages, add_generation_prompt, empty_reply), tokenizer, self)

    @abstractmethod
    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
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

    def _bos(self) -> list[Segment]:
        return [_control(self.bos_token)] if self.bos_token else []


# Meta Llama 3 Instruct. Source: meta-llama/llama3, llama/tokenizer.py, ChatFormat.encode_dialog_prompt (BOS, then
# per message a header and content.strip() + <|eot_id|>, then the assistant header), and the chat_template of
# Meta-Llama-3-8B-Instruct's tokenizer_config.json (``message['content'] | trim``). ChatFormat encodes the header's
# "\n\n" and the stripped content apart; Llama 3's pre-tokenizer never joins them, so that is the whole-text encoding.
@dataclass(frozen=True)
class Llama3Template(ChatTemplate):
    name: ClassVar[str] = "llama3"
    jinja: ClassVar[str] = r"""
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
    {%- if message['role'] == 'assistant' and (message['weight'] | default(1)) != 0 -%}
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

    @staticmethod
    def _header(role: str) -> list[Segment]:
        return [_control("<|start_header_id|>"), Segment(role), _control("<|end_header_id|>"), Segment("\n\n")]

    def _segments(self, messages, add_generation_prompt):
        segs = [_control("<|begin_of_text|>")]
        for m in messages:
            trained = _trained(m)
            segs += [*self._header(m["role"]), Segment(m["content"].strip(), trained), _control("<|eot_id|>", trained)]
        if add_generation_prompt:
            segs += self._header("assistant")
        return segs


# Llama 2 chat. Source: meta-llama/llama, llama/generation.py, Llama.chat_completion: B_INST, E_INST = "[INST]",
# "[/INST]"; B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"; the system message is folded into the first user turn;
# each exchange is encode(f"{B_INST} {(prompt).strip()} {E_INST} {(answer).strip()} ", bos=True, eos=True) and the
# last user turn encode(f"{B_INST} {(prompt).strip()} {E_INST}", bos=True, eos=False). The same text as the
# chat_template of Llama-2-7b-chat-hf's tokenizer_config.json. As in Meta's code, BOS and EOS are token ids around
# each exchange, and each exchange's text is encoded on its own (SentencePiece gives it its dummy-prefix "▁").
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
    {%- elif (message['weight'] | default(1)) != 0 -%}
        {%- generation -%}{{- ' ' + message['content'].strip() + ' ' -}}{{- eos_token -}}{%- endgeneration -%}
    {%- else -%}
        {{- ' ' + message['content'].strip() + ' ' -}}{{- eos_token -}}
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
                segs += [*self._bos(), Segment(f"[INST] {content.strip()} [/INST]", starts_text=True)]
            else:
                trained = _trained(m)
                segs += [Segment(f" {m['content'].strip()} ", trained), _control(self.eos_token, trained)]
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
# prepends; preprocess tokenises the whole conversation and masks by position, as render does. The space after
# "ASSISTANT:" is trained with the reply: the generation prompt ends at "ASSISTANT:" as in get_prompt, and
# tokenizers attach that space to the reply's first word.
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
    {%- elif (message['weight'] | default(1)) != 0 -%}
        {{- 'ASSISTANT:' -}}
        {%- generation -%}{{- ' ' + message['content'] -}}{{- eos_token -}}{%- endgeneration -%}
    {%- else -%}
        {{- 'ASSISTANT: ' + message['content'] -}}{{- eos_token -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""

    def _segments(self, messages, add_generation_prompt):
        system, turns = _split_system(messages)
        # BOS comes from FastChat's tokenizer call: the text after it is encoded as the start of a text.
        segs = [*self._bos(), Segment((VICUNA_SYSTEM if system is None else system) + " ", starts_text=True)]
        for m in turns:
            if m["role"] == "user":
                segs.append(Segment(f"USER: {m['content']} "))
            else:
                trained = _trained(m)
                segs += [Segment("ASSISTANT:"), Segment(f" {m['content']}", trained), _control(self.eos_token, trained)]
        if add_generation_prompt:
            segs.append(Segment("ASSISTANT:"))
        return segs


# Stanford Alpaca. Source: tatsu-lab/stanford_alpaca, train.py: PROMPT_DICT["prompt_input"] / ["prompt_no_input"]
# (below, split into preamble and body), chosen by example.get("input", "") != "", the target
# f"{example['output']}{tokenizer.eos_token}" appended directly (no separator), source + target tokenised together
# with BOS from the tokenizer call, and the source's tokens masked. Only the target is trained.
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def alpaca_fields(message: dict) -> tuple[str, str]:
    """``(instruction, input)`` of a user message: data_formats' Alpaca reader keeps a non-empty ``input`` beside
    ``content = instruction + "\\n\\n" + input`` (see data_formats.canonical); any other message is all instruction."""
    content, input_ = message["content"], message.get("input")
    if input_ is None or input_ == "":
        return content, ""
    if not isinstance(input_, str) or not content.endswith("\n\n" + input_):
        raise TemplateError(
            "alpaca: a user message's 'input' must be a string that its content ends with, after a blank line "
            "(content = instruction + '\\n\\n' + input)"
        )
    return content[: len(content) - len(input_) - 2], input_


@dataclass(frozen=True)
class AlpacaTemplate(_EosTemplate):
    """Single turn. The with-input prompt when the user message carries a non-empty ``input`` (an Alpaca record's,
    kept by data_formats), else the no-input prompt; a system message replaces the "Below is an instruction..."
    preamble."""

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
{%- set user = loop_messages[0] -%}
{%- if user['input'] is defined and user['input'] -%}
    {%- set instruction = user['content'][:(user['content'] | length) - (user['input'] | length) - 2] -%}
    {%- set preamble = 'Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.' -%}
    {%- set body = '### Instruction:\n' + instruction + '\n\n### Input:\n' + user['input'] + '\n\n### Response:' -%}
{%- else -%}
    {%- set preamble = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -%}
    {%- set body = '### Instruction:\n' + user['content'] + '\n\n### Response:' -%}
{%- endif -%}
{%- if system_message is not none -%}
    {%- set preamble = system_message -%}
{%- endif -%}
{{- bos_token -}}{{- preamble + '\n\n' + body -}}
{%- if loop_messages | length == 2 and (loop_messages[1]['weight'] | default(1)) != 0 -%}
    {%- generation -%}{{- loop_messages[1]['content'] -}}{{- eos_token -}}{%- endgeneration -%}
{%- elif loop_messages | length == 2 -%}
    {{- loop_messages[1]['content'] -}}{{- eos_token -}}
{%- endif -%}
"""

    def _segments(self, messages, add_generation_prompt):
        system, turns = _split_system(messages)
        if len(turns) > 2:
            raise TemplateError(
                f"alpaca is a single-turn template (one user message, then one assistant reply); got "
                f"{sum(m['role'] == 'user' for m in turns)} user turns (an Alpaca record's history makes earlier "
                f"turns: render it with a multi-turn template such as vicuna_v1.1 or llama3)"
            )
        instruction, input_ = alpaca_fields(turns[0])
        if input_:
            preamble = ALPACA_PREAMBLE_INPUT
            body = f"### Instruction:\n{instruction}\n\n### Input:\n{input_}\n\n### Response:"
        else:
            preamble = ALPACA_PREAMBLE_NO_INPUT
            body = f"### Instruction:\n{instruction}\n\n### Response:"
        # BOS comes from Stanford's tokenizer call: the text after it is encoded as the start of a text.
        segs = [*self._bos(), Segment(f"{preamble if system is None else system}\n\n{body}", starts_text=True)]
        if len(turns) == 2:
            trained = _trained(turns[1])
            segs += [Segment(turns[1]["content"], trained), _control(self.eos_token, trained)]
        return segs


# ChatML (OpenAI's format, as in Qwen and the common HF chatml chat_template): <|im_start|>{role}\n{content}<|im_end|>\n
@dataclass(frozen=True)
class ChatMLTemplate(ChatTemplate):
    name: ClassVar[str] = "chatml"
    jinja: ClassVar[str] = r"""
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['role'] == 'assistant' and (message['weight'] | default(1)) != 0 -%}
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
            trained = _trained(m)
            segs += [_control("<|im_start|>"), Segment(f"{m['role']}\n"), Segment(m["content"], trained)]
            segs += [_control("<|im_end|>", trained), Segment("\n")]
        if add_generation_prompt:
            segs += [_control("<|im_start|>"), Segment("assistant\n")]
        return segs


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own ``chat_template``, rendered by transformers' jinja renderer.

    Trained spans come from the ``{% generation %}`` markers when the template has them (transformers'
    ``render_jinja_template``, what ``return_assistant_tokens_mask`` uses; the k-th marked span is the k-th assistant
    message's). Otherwise prefixes are rendered incrementally: the text between the conversation up to an assistant
    message (with the generation prompt) and the conversation including it is that message's span; whitespace after
    its last special token (the newline after ChatML's ``<|im_end|>``) is not trained.

    Control tokens are the tokenizer's special tokens, and the added tokens the template's own text spells, where the
    template wrote them: found in a rendering whose message contents have such tokens blanked out (same length), so
    a token a message spells stays plain text.
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

    def _render(self, messages, add_generation_prompt: bool, spans: bool = False):
        """The rendered text, and with ``spans`` the character spans of its ``{% generation %}`` blocks."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[messages],
            chat_template=self.jinja,
            return_assistant_tokens_mask=spans,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )
        return (rendered[0], [tuple(span) for span in indices[0]]) if spans else rendered[0]

    def _special_tokens(self) -> list[str]:
        added = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        return list(dict.fromkeys([*added, *self.tokenizer.all_special_tokens]))

    def _control_pattern(self) -> re.Pattern:
        """Every token that is a control token where the template writes it, longest first (as tokenizers match)."""
        template_tokens = [
            t.content
            for t in self.tokenizer.added_tokens_decoder.values()
            if not t.special and t.content in self.jinja and not t.content.isspace()
        ]
        tokens = sorted(set(self._special_tokens()) | set(template_tokens), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)) or "(?!)")

    def _marked_spans(self, messages, add_generation_prompt):
        text, spans = self._render(messages, add_generation_prompt, spans=True)
        replies = [m for m in messages if m["role"] == "assistant"]
        trained = [_trained(m) for m in replies]
        if all(trained) or len(spans) == sum(trained):  # nothing to drop, or the template skips weight 0 itself
            return text, spans
        if len(spans) != len(replies):
            raise TemplateError(
                f"the tokenizer's chat_template marks {len(spans)} {{% generation %}} spans for {len(replies)} "
                f"assistant messages, so the replies with weight 0 cannot be told apart"
            )
        return text, [span for span, keep in zip(spans, trained, strict=True) if keep]

    def _prefix_spans(self, messages, add_generation_prompt):
        spans: list[tuple[int, int]] = []
        done = ""
        specials = self._special_tokens()
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"the tokenizer's chat_template does not render conversations as prefixes of longer ones "
                    f"(message {i}), so the assistant spans cannot be found; add {{% generation %}} markers to it "
                    f"or use a named template"
                )
            span = full[len(prompt) :]
            ends = [span.rfind(tok) + len(tok) for tok in specials if tok in span]
            trained = max(ends) if ends and not span[max(ends) :].strip() else len(span)
            if _trained(m):
                spans.append((len(prompt), len(prompt) + trained))
            done = full
        final = self._render(messages, add_generation_prompt=add_generation_prompt)
        if not final.startswith(done):
            raise TemplateError("the tokenizer's chat_template renders the conversation's end inconsistently")
        return final, spans

    def _control_positions(self, messages, add_generation_prompt, text: str) -> list[tuple[int, int]]:
        pattern = self._control_pattern()
        if not any(pattern.search(m["content"]) for m in messages):
            return [match.span() for match in pattern.finditer(text)]
        blanked = [{**m, "content": pattern.sub(lambda t: "\0" * len(t.group()), m["content"])} for m in messages]
        reference = self._render(blanked, add_generation_prompt)
        positions = [match.span() for match in pattern.finditer(reference)]
        if len(reference) != len(text) or any(text[a:b] != reference[a:b] for a, b in positions):
            raise TemplateError(
                "a message spells one of the tokenizer's control tokens, and the tokenizer's chat_template changes "
                "the message's length, so the template's own control tokens cannot be told apart from it"
            )
        return positions

    def _segments(self, messages, add_generation_prompt):
        if self.has_generation_markers:
            text, spans = self._marked_spans(messages, add_generation_prompt)
        else:
            text, spans = self._prefix_spans(messages, add_generation_prompt)
        return _cut(text, spans, self._control_positions(messages, add_generation_prompt, text))


def _cut(text: str, spans: list[tuple[int, int]], controls: list[tuple[int, int]]) -> list[Segment]:
    """``text`` as segments: each control position a control segment, the rest cut at the trained spans' edges."""

    def overlaps(a: int, b: int) -> bool:
        return any(a < end and start < b for start, end in spans)

    segments: list[Segment] = []
    at = 0
    for a, b in [*controls, (len(text), len(text))]:
        edges = sorted({at, a, *(x for span in spans for x in span if at < x < a)})
        segments += [Segment(text[x:y], overlaps(x, y)) for x, y in zip(edges, edges[1:], strict=False)]
        if a < b:
            segments.append(_control(text[a:b], overlaps(a, b)))
        at = b
    return segments


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
            f"template {template.name!r} writes {text!r} as one token (a control or end-of-turn token), which this "
            f"tokenizer splits into {len(ids)} tokens; add it as a special token or use a template made for this model"
        )
    return ids[0]


def stop_token_ids(template: str | ChatTemplate, tokenizer) -> list[int]:
    """The ids generation stops at: the template's end-of-turn tokens (each must be a single token)."""
    tpl = get_template(template, tokenizer)
    return list(dict.fromkeys(_single_token_id(tokenizer, s, tpl) for s in tpl.stop_strings))


def render(
    template: str | ChatTemplate,
    messages: list[dict[str, str]],
    tokenizer,
    add_generation_prompt: bool = False,
    empty_reply: bool = False,
) -> tuple[list[int], list[int]]:
    """Tokenise a conversation: ``(input_ids, labels)``, labels ``-100`` except on the assistant's replies.

    ``input_ids`` are the whole rendered text tokenised (``llama2``: each exchange, as Meta's code), with special
    tokens only where the template writes them: a special token spelled in a message is plain text. Trained: the
    tokens that begin in each assistant reply and its end-of-turn token (for llama3 ``{reply}<|eot_id|>``, not the
    assistant header), except replies with ``"weight": 0``. A conversation ends on an assistant turn, or on a user
    turn with ``add_generation_prompt=True`` (then the ids end with the assistant header, ready for generation, and
    no label is trained).

    ``empty_reply=True`` is for scoring what a model answered (a reward model reads the score at the last token): the
    last assistant reply may then be empty or blank, rendered as the template writes an empty content (for llama3
    the assistant header straight followed by ``<|eot_id|>``). Data to train on never sets it: an empty reply in a
    data file stays an error.

    Raises:
        ValueError: ``data_formats.DataFormatError`` for roles that break the rules (see :func:`_check_roles`);
            :class:`TemplateError` for an unknown template, a conversation the template cannot express (alpaca
            with several turns), control or end-of-turn tokens the tokenizer would split, or a tokenizer without
            offsets (not a fast one).
    """
    tpl = get_template(template, tokenizer)
    stop_token_ids(tpl, tokenizer)  # a template whose end-of-turn token the tokenizer would split cannot train
    return tpl.encode(messages, tokenizer, add_generation_prompt, empty_reply)


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
