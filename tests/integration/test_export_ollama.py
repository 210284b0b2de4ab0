"""Ollama export: the Modelfile's Go template renders our template's text; and the template/stop-token parity test.

Ollama is not installed here, so :func:`render_go` executes the subset of Go's ``text/template`` the Modelfiles use
(text, ``{{- -}}`` trimming, ``if``/``else if``/``else``/``end``, ``range``, ``$x :=`` and ``$x =`` with Go's block
scoping, ``eq``/``ne``/``not``/``and``/``or``/``len``, fields, string literals) and fails on anything else. The data
is what Ollama passes a ``.Messages`` template: the conversation (the Modelfile's SYSTEM prepended when it has no
system message) as ``{"Role", "Content"}``. Ollama prepends BOS itself when the GGUF says ``add_bos_token``.
Where a Go toolchain is installed, one test runs Go's own ``text/template`` on every case and compares.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
from factories import CONVERSATION, make_run_dir  # noqa: E402

from finetune.export import GGUF_FILE, MODELFILE, ExportError, export, modelfile, ollama_template  # noqa: E402
from finetune.models import load_tokenizer  # noqa: E402
from finetune.templates import get_template, render, stop_token_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# ------------------------------------------------------------------------------------------- a Go template subset

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\()|(\))|([^\s()]+))')
_WHITESPACE = " \t\r\n"


class GoTemplateError(Exception):
    pass


def _lex(source: str) -> list[tuple[str, str]]:
    """``[("text", s) | ("action", s)]`` with Go's trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if trim_next:
            text = text.lstrip(_WHITESPACE)
        if match.group(1):
            text = text.rstrip(_WHITESPACE)
        items += [("text", text), ("action", match.group(2).strip())]
        position, trim_next = match.end(), bool(match.group(3))
    tail = source[position:]
    items.append(("text", tail.lstrip(_WHITESPACE) if trim_next else tail))
    return items


def _parse(items, position=0, closers=()):
    """A list of nodes up to one of ``closers`` (returned with it): text, output, assign, if, range."""
    nodes = []
    while position < len(items):
        kind, value = items[position]
        position += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in closers or (word == "else" and "else" in closers):
            return nodes, position, value
        if word == "if":
            branches, otherwise = [], []
            condition = value[2:].strip()
            while True:
                body, position, closer = _parse(items, position, ("else", "end"))
                branches.append((condition, body))
                if closer == "end":
                    break
                if closer.startswith("else if"):
                    condition = closer[len("else if") :].strip()
                    continue
                otherwise, position, closer = _parse(items, position, ("end",))
                break
            nodes.append(("if", branches, otherwise))
        elif word == "range":
            spec = value[len("range") :].strip()
            names, _, expression = spec.rpartition(":=")
            variables = [n.strip() for n in names.split(",")] if names else []
            body, position, _ = _parse(items, position, ("end",))
            nodes.append(("range", variables, expression.strip() if names else spec, body))
        elif re.match(r"^\$\w*\s*:?=", value):
            name, operator, expression = re.match(r"^(\$\w*)\s*(:?=)\s*(.*)$", value, re.S).groups()
            nodes.append(("assign", name, operator == ":=", expression))
        elif word in ("end", "else", "with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"unsupported or unbalanced action {{{{{value}}}}}")
        else:
            nodes.append(("output", value))
    if closers:
        raise GoTemplateError(f"missing {{{{end}}}} (expected one of {closers})")
    return nodes, position, None


def _truth(value) -> bool:
    return not (value is None or value is False or value == 0 or value == "" or value == [] or value == {})


_FUNCTIONS = {
    "eq": lambda a, *others: any(a == b for b in others),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "and": lambda *args: next((a for a in args if not _truth(a)), args[-1]),
    "or": lambda *args: next((a for a in args if _truth(a)), args[-1]),
    "len": len,
}


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def declare(self, name, value):
        self.frames[-1][name] = value

    def assign(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")

    def lookup(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")


def _fields(value, chain: str):
    for name in filter(None, chain.split(".")):
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"can't evaluate field {name}")
        value = value[name]
    return value


def _evaluate(expression: str, dot, scope: _Scope):
    tokens = [next(g for g in m.groups() if g is not None) for m in _TOKEN.finditer(expression) if m.group().strip()]
    value, rest = _command(tokens, dot, scope)
    if rest:
        raise GoTemplateError(f"unexpected {rest} in {expression!r}")
    return value


def _command(tokens, dot, scope):
    """One command (a function applied to operands, or one operand) up to a closing parenthesis."""
    args = []
    while tokens and tokens[0] != ")":
        token, tokens = tokens[0], tokens[1:]
        if token == "(":
            value, tokens = _command(tokens, dot, scope)
            if not tokens or tokens[0] != ")":
                raise GoTemplateError("unclosed parenthesis")
            tokens = tokens[1:]
            args.append(value)
        else:
            args.append(_operand(token, dot, scope))
    if args and any(args[0] is function for function in _FUNCTIONS.values()):
        return args[0](*args[1:]), tokens
    if len(args) != 1:
        raise GoTemplateError(f"can't give arguments to a non-function: {args}")
    return args[0], tokens


def _operand(token, dot, scope):
    if token.startswith('"'):
        return json.loads(token)  # Go's escapes as used here (\n, \", \\) are JSON's
    if token in ("true", "false"):
        return token == "true"
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in _FUNCTIONS:
        return _FUNCTIONS[token]
    if token == ".":
        return dot
    if token.startswith("."):
        return _fields(dot, token)
    if token.startswith("$"):
        name, _, chain = token.partition(".")
        return _fields(scope.lookup(name), chain)
    raise GoTemplateError(f"unsupported operand {token!r}")


def _execute(nodes, dot, scope: _Scope, out: list[str]):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "output":
            value = _evaluate(node[1], dot, scope)
            out.append(("true" if value else "false") if isinstance(value, bool) else str(value))
        elif kind == "assign":
            _, name, declare, expression = node
            value = _evaluate(expression, dot, scope)
            scope.declare(name, value) if declare else scope.assign(name, value)
        elif kind == "if":
            _, branches, otherwise = node
            body = next((body for cond, body in branches if _truth(_evaluate(cond, dot, scope))), otherwise)
            scope.frames.append({})
            _execute(body, dot, scope, out)
            scope.frames.pop()
        elif kind == "range":
            _, variables, expression, body = node
            for index, element in enumerate(_evaluate(expression, dot, scope)):
                scope.frames.append({})
                if len(variables) == 2:
                    scope.declare(variables[0], index)
                    scope.declare(variables[1], element)
                elif len(variables) == 1:
                    scope.declare(variables[0], element)
                _execute(body, element, scope, out)
                scope.frames.pop()


def render_go(source: str, data: dict) -> str:
    nodes, _, _ = _parse(_lex(source))
    out: list[str] = []
    _execute(nodes, data, _Scope(data), out)
    return "".join(out)


def ollama_render(template_source: str, messages, system: str | None = None) -> str:
    """What Ollama's chat endpoint renders: SYSTEM prepended when the conversation has no system message."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system or ""}
    return render_go(template_source, data)


def test_go_subset_follows_go_semantics():
    """Hand-worked from the text/template documentation."""
    assert render_go('a  \n{{- "b" -}}  \n c', {}) == "abc"
    assert render_go("x {{ 3 }} y", {}) == "x 3 y"  # no trim without the dash
    # `=` inside range assigns the outer variable (Go 1.11+); `:=` inside a block is gone after its end
    assert render_go('{{ $x := "0" }}{{ range .L }}{{ $x = . }}{{ end }}{{ $x }}', {"L": ["1", "2"]}) == "2"
    with pytest.raises(GoTemplateError, match="undefined variable"):
        render_go('{{ if true }}{{ $y := "1" }}{{ end }}{{ $y }}', {})
    source = '{{ range $i, $m := .M }}{{ if eq $m.R "a" }}A{{ else if ne $i 0 }}{{ $i }}{{ else }}-{{ end }}{{ end }}'
    assert render_go(source, {"M": [{"R": "b"}, {"R": "a"}, {"R": "c"}]}) == "-A2"
    assert render_go('{{ if and true "" }}T{{ else }}F{{ end }}{{ if not "" }}N{{ end }}', {}) == "FN"
    assert render_go('{{ "q\\"\\n" }}', {}) == 'q"\n'
    assert render_go("{{ len .L }}", {"L": [1, 2, 3]}) == "3"


# ----------------------------------------------------------------------------------- Modelfile template vs ours

OLLAMA_TEMPLATES = ["llama3", "llama2", "chatml", "vicuna_v1.1", "alpaca"]
TURNS = [message for message in CONVERSATION if message["role"] != "system"]
SYSTEM = CONVERSATION[0]


def _cases(name):
    """(messages, add_generation_prompt): with and without a system message; ending on a user or assistant turn."""
    if name == "alpaca":  # single turn
        conversations = [TURNS[:2], [SYSTEM, *TURNS[:2]]]
    else:
        conversations = [TURNS, [SYSTEM, *TURNS], TURNS[:2]]
    for messages in conversations:
        yield messages, False
        yield messages[:-1], True


def _with_bos(template, tokenizer, rendered: str) -> str:
    """Ollama prepends BOS when the GGUF says add_bos_token, which the export sets when the template starts with BOS."""
    starts = template.text([TURNS[0]], add_generation_prompt=True).startswith(tokenizer.bos_token)
    return tokenizer.bos_token + rendered if starts else rendered


@pytest.mark.parametrize("name", OLLAMA_TEMPLATES)
def test_modelfile_template_renders_our_text(name, tokenizer):
    template = get_template(name, tokenizer)
    source = ollama_template(template, tokenizer)
    for messages, prompt in _cases(name):
        expected = template.text(messages, add_generation_prompt=prompt)
        assert _with_bos(template, tokenizer, ollama_render(source, messages)) == expected, (messages, prompt)


@pytest.mark.parametrize("name", OLLAMA_TEMPLATES)
def test_modelfile_system_directive_acts_as_a_system_message(name, tokenizer):
    template = get_template(name, tokenizer)
    source = ollama_template(template, tokenizer)
    messages = TURNS[:1]
    expected = template.text([SYSTEM, *messages], add_generation_prompt=True)
    assert _with_bos(template, tokenizer, ollama_render(source, messages, system=SYSTEM["content"])) == expected


def test_known_differences_are_the_documented_ones(tokenizer):
    """Go templates cannot strip whitespace or split strings: llama3 contents are not trimmed, and alpaca's
    instruction + input form is not produced (documented in ollama_template)."""
    llama3 = get_template("llama3", tokenizer)
    padded = [{"role": "user", "content": " hi \n"}]
    ours = llama3.text(padded, add_generation_prompt=True).removeprefix(tokenizer.bos_token)
    assert ollama_render(ollama_template(llama3, tokenizer), padded) == ours.replace("hi", " hi \n")
    alpaca = get_template("alpaca", tokenizer)
    with_input = [{"role": "user", "content": "Translate to French.\n\nGood morning", "input": "Good morning"}]
    ours = alpaca.text(with_input, True).removeprefix(tokenizer.bos_token)
    assert ollama_render(ollama_template(alpaca, tokenizer), with_input) != ours
    with_template = load_tokenizer("tiny")
    with_template.chat_template = llama3.jinja
    with pytest.raises(ExportError, match="no Ollama template"):
        ollama_template(get_template("tokenizer", with_template), with_template)


GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var cases []struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		var b strings.Builder
		t := template.Must(template.New("").Parse(c.Template))
		if err := t.Execute(&b, map[string]any{"Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (checks the renderer against Go itself)")
def test_go_itself_renders_the_modelfiles_as_our_renderer_does(tokenizer, tmp_path):
    """Go's own text/template (the engine Ollama runs) on every template and case above, plus contents with quotes,
    braces, backslashes and surrounding whitespace: the same strings as :func:`render_go`."""
    odd = [
        [{"role": "user", "content": " padded \n"}],
        [{"role": "user", "content": "Translate.\n\nGood morning"}],
        [SYSTEM, {"role": "user", "content": 'a "quoted" {{x}} \\ back'}],
    ]
    cases, expected = [], []
    for name in OLLAMA_TEMPLATES:
        source = ollama_template(get_template(name, tokenizer), tokenizer)
        for messages in [m for m, _ in _cases(name)] + odd:
            cases.append(
                {"Template": source, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
            )
            expected.append(ollama_render(source, messages))
    (tmp_path / "main.go").write_text(GO_RENDERER)
    result = subprocess.run(
        ["go", "run", str(tmp_path / "main.go")], input=json.dumps(cases), capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == expected


def test_modelfile_lines(tokenizer):
    template = get_template("llama3", tokenizer)
    text = modelfile(template, tokenizer, system="Be terse.")
    assert text.startswith(f"FROM ./{GGUF_FILE}\n")
    assert re.findall(r"^PARAMETER stop (.*)$", text, re.M) == ['"<|eot_id|>"', '"<|end_of_text|>"']
    assert 'SYSTEM """Be terse."""' in text
    assert re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1) == ollama_template(template, tokenizer)


# ------------------------------------------------------------------------------- one conversation, every path


def _parse_modelfile(text: str) -> dict:
    return {
        "from": re.search(r"^FROM (.*)$", text, re.M).group(1),
        "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
        "stops": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.M)],
        "system": (re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S) or [None, None])[1],
    }


@pytest.mark.parametrize("name", ["llama3", "chatml"])  # a template that starts with BOS, and one that does not
def test_template_and_stop_token_parity_across_every_path(name, tmp_path_factory):
    """The same conversation through the training render, the saved tokenizer's chat_template, the GGUF's template
    and tokenizer, and the Ollama Modelfile: one text, one list of ids, and every path stops on the same tokens."""
    import gguf
    from transformers import AutoTokenizer, GenerationConfig

    root = tmp_path_factory.mktemp(name)
    run = make_run_dir(root / "run", template=name, seed=4)
    ollama = export(run, "ollama", root / "ollama", dtype="f16", system=SYSTEM["content"])
    tokenizer = load_tokenizer(str(run))
    template = get_template(name, tokenizer)
    stops = stop_token_ids(template, tokenizer)
    gguf_tokenizer = AutoTokenizer.from_pretrained(ollama, gguf_file=GGUF_FILE)
    reader = gguf.GGUFReader(ollama / GGUF_FILE)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    parsed = _parse_modelfile((ollama / MODELFILE).read_text())
    assert parsed["from"] == f"./{GGUF_FILE}" and (ollama / GGUF_FILE).is_file()

    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:-1], True)):
        training_ids = render(template, messages, tokenizer, add_generation_prompt=prompt)[0]
        texts = {
            "training": template.text(messages, add_generation_prompt=prompt),
            "run tokenizer chat_template": tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            ),
            "gguf chat_template": gguf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            ),
            "ollama Modelfile": _with_bos(
                template, tokenizer, ollama_render(parsed["template"], messages[1:], parsed["system"])
            ),
        }
        assert len(set(texts.values())) == 1, texts
        text = texts["training"]
        assert tokenizer.encode(text, add_special_tokens=False) == training_ids
        assert gguf_tokenizer.encode(text, add_special_tokens=False) == training_ids

    stop_sets = {
        "training": stops,
        "generation_config.json": GenerationConfig.from_pretrained(run).eos_token_id,
        "ollama PARAMETER stop": tokenizer.convert_tokens_to_ids(parsed["stops"]),
        "gguf tokens named by the Modelfile": [fields["tokenizer.ggml.tokens"].index(s) for s in parsed["stops"]],
    }
    assert all(ids == stops for ids in stop_sets.values()), stop_sets
    # llama.cpp stops at EOS/EOT (and at tokens it recognises by text, such as <|end_of_text|>)
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == stops[0]
    assert fields["tokenizer.ggml.add_bos_token"] == (name == "llama3")
