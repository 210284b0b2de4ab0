"""Golden tests for the chat templates: exact text, trained spans, jinja parity, stop tokens, saving.

Every expected string below is written out by hand from the format's reference (Meta's llama and llama3 repos,
FastChat's conversation.py, Stanford Alpaca's train.py, ChatML), never computed by the code under test.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re  # noqa: E402

import pytest  # noqa: E402

from finetune.models import load_tokenizer  # noqa: E402
from finetune.templates import (  # noqa: E402
    IGNORE_INDEX,
    TEMPLATES,
    ChatMLTemplate,
    Llama2Template,
    TemplateError,
    get_template,
    render,
    render_prompt,
    save_with_template,
    stop_token_ids,
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
SINGLE = [
    {"role": "user", "content": "Name the capital city of Cuba."},
    {"role": "assistant", "content": "Havana"},
]
# The first turns have surrounding whitespace: llama3 and llama2 strip contents, the others keep them.
MULTI = [
    {"role": "user", "content": " Hi there!\n"},
    {"role": "assistant", "content": "Hello. "},
    {"role": "user", "content": "Reverse the words: pen hammer nest"},
    {"role": "assistant", "content": "nest hammer pen"},
]
# Alpaca's instruction and input as data_formats reads them: joined by a blank line, the input kept beside.
WITH_INPUT = [
    {"role": "user", "content": "Translate to French.\n\nGood morning", "input": "Good morning"},
    {"role": "assistant", "content": "Bonjour"},
]
CASES = {
    "single": SINGLE,
    "single_system": [SYSTEM, *SINGLE],
    "multi": MULTI,
    "multi_system": [SYSTEM, *MULTI],
    "input": WITH_INPUT,
    "input_system": [SYSTEM, *WITH_INPUT],
}

VICUNA_DEFAULT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# (template, case) -> (exact text, the trained spans decoded and concatenated). BOS/EOS text is <s> / </s>.
GOLDEN = {
    ("llama3", "single"): (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName the capital city of Cuba.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHavana<|eot_id|>",
        "Havana<|eot_id|>",
    ),
    ("llama3", "single_system"): (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. Answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName the capital city of Cuba.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHavana<|eot_id|>",
        "Havana<|eot_id|>",
    ),
    ("llama3", "multi"): (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nReverse the words: pen hammer nest<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nnest hammer pen<|eot_id|>",
        "Hello.<|eot_id|>nest hammer pen<|eot_id|>",
    ),
    ("llama3", "multi_system"): (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. Answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nReverse the words: pen hammer nest<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nnest hammer pen<|eot_id|>",
        "Hello.<|eot_id|>nest hammer pen<|eot_id|>",
    ),
    ("llama2", "single"): (
        "<s>[INST] Name the capital city of Cuba. [/INST] Havana </s>",
        " Havana </s>",
    ),
    ("llama2", "single_system"): (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. Answer briefly.\n<</SYS>>\n\n"
        "Name the capital city of Cuba. [/INST] Havana </s>",
        " Havana </s>",
    ),
    ("llama2", "multi"): (
        "<s>[INST] Hi there! [/INST] Hello. </s><s>[INST] Reverse the words: pen hammer nest [/INST] nest hammer pen </s>",
        " Hello. </s> nest hammer pen </s>",
    ),
    # Meta strips the joined "<<SYS>>...<</SYS>>\n\n{user}" string, so the user's leading space survives.
    ("llama2", "multi_system"): (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. Answer briefly.\n<</SYS>>\n\n Hi there! [/INST] Hello. </s>"
        "<s>[INST] Reverse the words: pen hammer nest [/INST] nest hammer pen </s>",
        " Hello. </s> nest hammer pen </s>",
    ),
    ("vicuna_v1.1", "single"): (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Name the capital city of Cuba. ASSISTANT: Havana</s>",
        " Havana</s>",
    ),
    ("vicuna_v1.1", "single_system"): (
        "<s>You are a helpful assistant. Answer briefly. USER: Name the capital city of Cuba. ASSISTANT: Havana</s>",
        " Havana</s>",
    ),
    ("vicuna_v1.1", "multi"): (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER:  Hi there!\n ASSISTANT: Hello. </s>"
        "USER: Reverse the words: pen hammer nest ASSISTANT: nest hammer pen</s>",
        " Hello. </s> nest hammer pen</s>",
    ),
    ("vicuna_v1.1", "multi_system"): (
        "<s>You are a helpful assistant. Answer briefly. USER:  Hi there!\n ASSISTANT: Hello. </s>"
        "USER: Reverse the words: pen hammer nest ASSISTANT: nest hammer pen</s>",
        " Hello. </s> nest hammer pen</s>",
    ),
    ("alpaca", "single"): (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName the capital city of Cuba.\n\n### Response:Havana</s>",
        "Havana</s>",
    ),
    ("alpaca", "single_system"): (
        "<s>You are a helpful assistant. Answer briefly.\n\n### Instruction:\nName the capital city of Cuba."
        "\n\n### Response:Havana</s>",
        "Havana</s>",
    ),
    ("alpaca", "input"): (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood morning\n\n### Response:Bonjour</s>",
        "Bonjour</s>",
    ),
    ("alpaca", "input_system"): (
        "<s>You are a helpful assistant. Answer briefly.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood morning\n\n### Response:Bonjour</s>",
        "Bonjour</s>",
    ),
    ("chatml", "single"): (
        "<|im_start|>user\nName the capital city of Cuba.<|im_end|>\n<|im_start|>assistant\nHavana<|im_end|>\n",
        "Havana<|im_end|>",
    ),
    ("chatml", "single_system"): (
        "<|im_start|>system\nYou are a helpful assistant. Answer briefly.<|im_end|>\n"
        "<|im_start|>user\nName the capital city of Cuba.<|im_end|>\n<|im_start|>assistant\nHavana<|im_end|>\n",
        "Havana<|im_end|>",
    ),
    ("chatml", "multi"): (
        "<|im_start|>user\n Hi there!\n<|im_end|>\n<|im_start|>assistant\nHello. <|im_end|>\n"
        "<|im_start|>user\nReverse the words: pen hammer nest<|im_end|>\n"
        "<|im_start|>assistant\nnest hammer pen<|im_end|>\n",
        "Hello. <|im_end|>nest hammer pen<|im_end|>",
    ),
    ("chatml", "multi_system"): (
        "<|im_start|>system\nYou are a helpful assistant. Answer briefly.<|im_end|>\n"
        "<|im_start|>user\n Hi there!\n<|im_end|>\n<|im_start|>assistant\nHello. <|im_end|>\n"
        "<|im_start|>user\nReverse the words: pen hammer nest<|im_end|>\n"
        "<|im_start|>assistant\nnest hammer pen<|im_end|>\n",
        "Hello. <|im_end|>nest hammer pen<|im_end|>",
    ),
}

# (template, case) -> the generation prompt for the case without its last (assistant) message.
GOLDEN_PROMPTS = {
    ("llama3", "single"): (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName the capital city of Cuba.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("llama3", "multi_system"): (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. Answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nReverse the words: pen hammer nest<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("llama2", "single"): "<s>[INST] Name the capital city of Cuba. [/INST]",
    ("llama2", "multi_system"): (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. Answer briefly.\n<</SYS>>\n\n Hi there! [/INST] Hello. </s>"
        "<s>[INST] Reverse the words: pen hammer nest [/INST]"
    ),
    ("vicuna_v1.1", "single"): (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Name the capital city of Cuba. ASSISTANT:"
    ),
    ("vicuna_v1.1", "multi_system"): (
        "<s>You are a helpful assistant. Answer briefly. USER:  Hi there!\n ASSISTANT: Hello. </s>"
        "USER: Reverse the words: pen hammer nest ASSISTANT:"
    ),
    ("alpaca", "single"): (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName the capital city of Cuba.\n\n### Response:"
    ),
    ("alpaca", "input_system"): (
        "<s>You are a helpful assistant. Answer briefly.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood morning\n\n### Response:"
    ),
    ("chatml", "single"): ("<|im_start|>user\nName the capital city of Cuba.<|im_end|>\n<|im_start|>assistant\n"),
    ("chatml", "multi_system"): (
        "<|im_start|>system\nYou are a helpful assistant. Answer briefly.<|im_end|>\n"
        "<|im_start|>user\n Hi there!\n<|im_end|>\n<|im_start|>assistant\nHello. <|im_end|>\n"
        "<|im_start|>user\nReverse the words: pen hammer nest<|im_end|>\n<|im_start|>assistant\n"
    ),
}

NAMED = [name for name in TEMPLATES if name != "tokenizer"]

# The official Hugging Face chat_templates, verbatim (tokenizer_config.json of Meta-Llama-3-8B-Instruct and of
# Llama-2-7b-chat-hf): the `tokenizer` template running them must agree with our llama3 / llama2.
META_LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
META_LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tiny():
    """The embedded tokenizer as shipped: Llama 3 specials, BOS <|begin_of_text|>, EOS <|end_of_text|>."""
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def tok():
    """The embedded tokenizer with Llama 2's BOS/EOS text (<s> and </s>, special tokens of its vocabulary)."""
    tokenizer = load_tokenizer("tiny")
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    return tokenizer


def fresh_tokenizer(chat_template=None, bos="<|begin_of_text|>", eos="<|end_of_text|>"):
    tokenizer = load_tokenizer("tiny")
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = chat_template
    return tokenizer


def decode_trained(input_ids, labels, tokenizer):
    """Each run of labelled tokens decoded on its own, concatenated in order."""
    runs, previous = [], IGNORE_INDEX
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return "".join(tokenizer.decode(run, skip_special_tokens=False) for run in runs)


def prompt_of(messages):
    return messages[:-1]


# ------------------------------------------------------------------------------------------------------ golden text


@pytest.mark.parametrize("name, case", list(GOLDEN), ids=[f"{n}-{c}" for n, c in GOLDEN])
def test_text_is_the_reference_format(name, case, tok):
    assert get_template(name, tok).text(CASES[case]) == GOLDEN[name, case][0]


@pytest.mark.parametrize("name, case", list(GOLDEN), ids=[f"{n}-{c}" for n, c in GOLDEN])
def test_render_trains_exactly_the_replies_and_their_end_of_turn(name, case, tok):
    text, trained = GOLDEN[name, case]
    input_ids, labels = render(name, CASES[case], tok)
    assert len(input_ids) == len(labels)
    assert tok.decode(input_ids, skip_special_tokens=False) == text
    assert decode_trained(input_ids, labels, tok) == trained
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels, strict=True))


@pytest.mark.parametrize("name, case", list(GOLDEN_PROMPTS), ids=[f"{n}-{c}" for n, c in GOLDEN_PROMPTS])
def test_generation_prompt_ends_in_the_assistant_header(name, case, tok):
    expected = GOLDEN_PROMPTS[name, case]
    messages = prompt_of(CASES[case])
    assert get_template(name, tok).text(messages, add_generation_prompt=True) == expected
    prompt = render_prompt(name, messages, tok)
    assert tok.decode(prompt, skip_special_tokens=False) == expected
    ids, labels = render(name, messages, tok, add_generation_prompt=True)
    assert ids == prompt and labels[-1] == IGNORE_INDEX
    # The model is trained on exactly the tokens it is later prompted with.
    full_ids, _ = render(name, CASES[case], tok)
    assert full_ids[: len(prompt)] == prompt


def test_eos_templates_take_the_tokenizers_bos_and_eos(tiny):
    """With the shipped tokenizer (Llama 3 specials) llama2 writes <|begin_of_text|> / <|end_of_text|>."""
    text = get_template("llama2", tiny).text(SINGLE)
    assert text == "<|begin_of_text|>[INST] Name the capital city of Cuba. [/INST] Havana <|end_of_text|>"
    ids, labels = render("vicuna_v1.1", SINGLE, tiny)
    assert decode_trained(ids, labels, tiny) == " Havana<|end_of_text|>"
    assert Llama2Template().text(SINGLE) == "<s>[INST] Name the capital city of Cuba. [/INST] Havana </s>"


# ------------------------------------------------------------------------------------------------------ role checks

BAD_CONVERSATIONS = [
    ([], False, r"non-empty list of messages"),
    (
        [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}],
        False,
        r"messages\[0\]\.role.*'user'",
    ),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False, r"messages\[1\]\.role.*'assistant'"),
    ([*SINGLE, SYSTEM, *SINGLE], False, r"messages\[2\]\.role.*may only come first"),
    ([*SINGLE, {"role": "user", "content": "More?"}], False, r"end on an 'assistant' turn"),
    (SINGLE, True, r"end on a 'user' turn"),
    ([{"role": "bot", "content": "Hi"}], False, r"messages\[0\]\.role.*one of system, user, assistant"),
    ([{"role": "user", "content": None}], True, r"messages\[0\]\.content.*a string"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], False, r"non-empty assistant reply"),
    ([SYSTEM], True, r"at least one 'user' turn"),
]


@pytest.mark.parametrize("messages, generation, match", BAD_CONVERSATIONS)
def test_roles_are_checked_with_a_message_naming_the_problem(messages, generation, match, tok):
    with pytest.raises(ValueError, match=match):
        render("llama3", messages, tok, add_generation_prompt=generation)


@pytest.mark.parametrize("name", NAMED)
def test_every_template_checks_roles(name, tok):
    swapped = [SINGLE[1], SINGLE[0]]
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        get_template(name, tok).text(swapped)
    with pytest.raises(ValueError, match=r"end on a 'user' turn"):
        render_prompt(name, SINGLE, tok)


def test_alpaca_is_single_turn(tok):
    with pytest.raises(TemplateError, match="alpaca is a single-turn template .* got 2 user turns"):
        render("alpaca", MULTI, tok)
    with pytest.raises(Exception, match="single-turn"):  # the jinja refuses too, through raise_exception
        tok.apply_chat_template(MULTI, chat_template=get_template("alpaca").jinja, tokenize=False)


def test_alpaca_without_blank_line_uses_the_no_input_prompt(tok):
    messages = [{"role": "user", "content": "Say hi.\n\n"}, {"role": "assistant", "content": "hi"}]
    assert get_template("alpaca", tok).text(messages) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n\n\n### Response:hi</s>"
    )


def test_unknown_template_names_the_known_ones(tok):
    with pytest.raises(TemplateError, match="unknown template 'llama9'; expected one of llama3, llama2"):
        render("llama9", SINGLE, tok)


# ------------------------------------------------------------------------------------------------ jinja and masks


JINJA_CASES = [(name, case) for name, case in GOLDEN]


@pytest.mark.parametrize("name, case", JINJA_CASES, ids=[f"{n}-{c}" for n, c in JINJA_CASES])
@pytest.mark.parametrize("generation", [False, True], ids=["train", "prompt"])
def test_jinja_renders_the_same_text(name, case, generation, tok):
    template = get_template(name, tok)
    messages = prompt_of(CASES[case]) if generation else CASES[case]
    rendered = tok.apply_chat_template(
        messages, chat_template=template.jinja, tokenize=False, add_generation_prompt=generation
    )
    assert rendered == template.text(messages, add_generation_prompt=generation)


@pytest.mark.parametrize("name, case", JINJA_CASES, ids=[f"{n}-{c}" for n, c in JINJA_CASES])
def test_generation_markers_mask_the_trained_tokens(name, case, tok):
    """transformers' return_assistant_tokens_mask (from the {% generation %} markers) marks our labelled tokens."""
    out = tok.apply_chat_template(
        CASES[case],
        chat_template=get_template(name, tok).jinja,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    input_ids, labels = render(name, CASES[case], tok)
    assert list(out["input_ids"]) == input_ids
    assert [bool(m) for m in out["assistant_masks"]] == [label != IGNORE_INDEX for label in labels]


# ---------------------------------------------------------------------------------------------------- stop tokens


def test_stop_strings():
    assert get_template("llama3").stop_strings == ("<|eot_id|>", "<|end_of_text|>")
    assert get_template("chatml").stop_strings == ("<|im_end|>",)
    for name in ("llama2", "vicuna_v1.1", "alpaca"):
        assert get_template(name).stop_strings == ("</s>",)


@pytest.mark.parametrize(
    "name, stops",
    [
        ("llama3", ["<|eot_id|>", "<|end_of_text|>"]),
        ("chatml", ["<|im_end|>"]),
        ("llama2", ["<|end_of_text|>"]),
        ("vicuna_v1.1", ["<|end_of_text|>"]),
        ("alpaca", ["<|end_of_text|>"]),
    ],
)
def test_stop_token_ids(name, stops, tiny):
    assert stop_token_ids(name, tiny) == [tiny.convert_tokens_to_ids(s) for s in stops]


def test_stop_token_ids_follow_the_tokenizers_eos(tok):
    assert stop_token_ids("llama2", tok) == [tok.convert_tokens_to_ids("</s>")]


def test_an_end_of_turn_the_tokenizer_would_split_is_an_error(tok):
    template = Llama2Template(bos_token="<s>", eos_token="<|not_a_token|>")
    with pytest.raises(TemplateError, match="writes '<\\|not_a_token\\|>' as one token .* which this tokenizer splits"):
        stop_token_ids(template, tok)
    with pytest.raises(TemplateError, match="not_a_token"):
        render(template, SINGLE, tok)


# ---------------------------------------------------------------------------------------------- tokenizer template


def without_generation_markers(jinja):
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", jinja)


@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "prefix-rendering"])
@pytest.mark.parametrize("case", ["single", "single_system", "multi", "multi_system"])
def test_tokenizer_template_labels_like_the_named_template(case, markers):
    jinja = ChatMLTemplate.jinja if markers else without_generation_markers(ChatMLTemplate.jinja)
    tokenizer = fresh_tokenizer(chat_template=jinja)
    template = get_template("tokenizer", tokenizer)
    assert template.has_generation_markers is markers
    messages = CASES[case]
    assert template.text(messages) == GOLDEN["chatml", case][0]
    input_ids, labels = render("tokenizer", messages, tokenizer)
    assert (input_ids, labels) == render("chatml", messages, tokenizer)
    assert decode_trained(input_ids, labels, tokenizer) == GOLDEN["chatml", case][1]
    assert render_prompt("tokenizer", prompt_of(messages), tokenizer) == render_prompt(
        "chatml", prompt_of(messages), tokenizer
    )
    assert stop_token_ids("tokenizer", tokenizer) == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
    ]


@pytest.mark.parametrize("case", ["single_system", "multi"])
def test_tokenizer_template_with_metas_llama3_template_matches_llama3(case):
    tokenizer = fresh_tokenizer(chat_template=META_LLAMA3_CHAT_TEMPLATE)
    assert get_template("tokenizer", tokenizer).text(CASES[case]) == GOLDEN["llama3", case][0]
    assert render("tokenizer", CASES[case], tokenizer) == render("llama3", CASES[case], tokenizer)
    assert stop_token_ids("tokenizer", tokenizer) == stop_token_ids("llama3", tokenizer)


@pytest.mark.parametrize("case", ["single_system", "multi_system"])
def test_tokenizer_template_with_metas_llama2_template_matches_llama2(case):
    tokenizer = fresh_tokenizer(chat_template=META_LLAMA2_CHAT_TEMPLATE, bos="<s>", eos="</s>")
    assert get_template("tokenizer", tokenizer).text(CASES[case]) == GOLDEN["llama2", case][0]
    input_ids, labels = render("tokenizer", CASES[case], tokenizer)
    assert (input_ids, labels) == render("llama2", CASES[case], tokenizer)
    assert decode_trained(input_ids, labels, tokenizer) == GOLDEN["llama2", case][1]
    assert stop_token_ids("tokenizer", tokenizer) == [tokenizer.convert_tokens_to_ids("</s>")]


def test_tokenizer_template_needs_a_chat_template(tiny):
    assert tiny.chat_template is None
    with pytest.raises(TemplateError, match="needs a tokenizer that has a chat_template"):
        render("tokenizer", SINGLE, tiny)


def test_tokenizer_template_that_is_not_prefix_stable_is_refused():
    jinja = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    tokenizer = fresh_tokenizer(chat_template=jinja)
    with pytest.raises(TemplateError, match="does not render conversations as prefixes"):
        render("tokenizer", MULTI, tokenizer)


# ---------------------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", NAMED)
def test_saved_tokenizer_renders_the_template_and_stops_on_its_end_of_turn(name, tok, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    save_with_template(tok, name, tmp_path)
    assert tok.chat_template is None  # the caller's tokenizer is untouched

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    template = get_template(name, tok)
    for case in ("single_system", "multi") if name != "alpaca" else ("single_system", "input"):
        messages = CASES[case]
        assert reloaded.apply_chat_template(messages, tokenize=False) == GOLDEN[name, case][0]
        assert reloaded.apply_chat_template(
            prompt_of(messages), tokenize=False, add_generation_prompt=True
        ) == template.text(prompt_of(messages), add_generation_prompt=True)

    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.eos_token_id == stop_token_ids(name, tok)
    assert config.bos_token_id == tok.bos_token_id
    assert config.pad_token_id == tok.pad_token_id


def test_save_with_template_keeps_the_model_configs_generation_settings(tiny, tmp_path):
    from transformers import AutoConfig, GenerationConfig

    from finetune.models import resolve_model

    model_config = AutoConfig.from_pretrained(resolve_model("tiny"))
    save_with_template(tiny, "llama3", tmp_path, model_config=model_config)
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.eos_token_id == [
        tiny.convert_tokens_to_ids("<|eot_id|>"),
        tiny.convert_tokens_to_ids("<|end_of_text|>"),
    ]
    assert config.bos_token_id == tiny.convert_tokens_to_ids("<|begin_of_text|>")
    assert config.pad_token_id == tiny.convert_tokens_to_ids("<|pad|>")
