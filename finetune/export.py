"""Export a training run for the places people run models: PEFT, transformers, llama.cpp and Ollama.

    finetune export runs/sft --to adapter --out exports/sft-adapter
    finetune export runs/sft --to merged  --out exports/sft-merged --dtype bfloat16
    finetune export runs/sft --to gguf    --out exports/sft-gguf   --dtype q8_0
    finetune export runs/sft --to ollama  --out exports/sft-ollama --system "You are terse."

- ``adapter``: the PEFT adapter, the tokenizer with the run's chat template, and a generation config whose
  ``eos_token_id`` lists the template's stop tokens; ``peft.PeftModel.from_pretrained(base, out)`` loads it.
- ``merged``: the adapter merged into the base (``merge_and_unload``) and saved as safetensors in ``--dtype``, loadable
  with ``AutoModelForCausalLM.from_pretrained(out)`` alone. A QLoRA run's base is loaded *unquantised* for the merge:
  adding a LoRA update to 4-bit weights would round it away.
- ``gguf``: ``model.gguf`` for llama.cpp, written by :mod:`finetune.gguf_writer` (no llama.cpp build needed).
- ``ollama``: the GGUF plus a ``Modelfile`` whose ``TEMPLATE`` (Go template syntax) renders conversations as the
  run's chat template does and whose ``PARAMETER stop`` lines list its stop tokens (:func:`ollama_template`).

Every export writes ``export_metadata.json`` (base model, run, adapter method, template, stop tokens, dtype, toolkit
version, sha256 of the weights) and a model card ``README.md`` (:mod:`finetune.model_card`). The output is assembled
in a temporary directory beside ``--out`` and renamed into place, so a failed export leaves nothing half-written; an
existing ``--out`` is replaced only with ``--overwrite``.

``RUN_DIR`` is a run directory (``config.yaml`` and an adapter, or a full fine-tune's model), or a model directory
such as a merged export (template from its ``export_metadata.json``, or ``--template``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("adapter", "merged", "gguf", "ollama")
"""What ``--to`` accepts."""
MERGED_DTYPES = ("float32", "float16", "bfloat16")
"""What ``--dtype`` accepts for ``merged`` (default: the base checkpoint's own dtype)."""
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
METADATA_FILE = "export_metadata.json"
SENTENCEPIECE_FILE = "tokenizer.model"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class ExportError(ValueError):
    """A user's mistake (not a run directory, unknown format or dtype, output exists): one line, exit status 2."""


@dataclass
class RunSource:
    """What a run (or model) directory holds and where its parts come from."""

    path: Path
    """The directory, absolute."""
    has_adapter: bool
    """A PEFT adapter (``adapter_config.json`` + weights) to put on ``base_model``."""
    base_model: str | None
    """The base's name as the run's config gives it (``tiny``, a directory or a hub id): the adapter goes onto it;
    for a full model only recorded (from ``config.yaml`` or an earlier export's metadata; None if unknown)."""
    method: str
    """``lora``, ``qlora`` or ``full``."""
    template: str
    """Chat template name (see :mod:`finetune.templates`)."""
    attn_implementation: str = "auto"
    """The run's ``model.attn_implementation``; ``auto`` is resolved for this machine when the base is loaded."""
    config: dict = field(default_factory=dict)
    """The run's resolved ``config.yaml`` (empty for a plain model directory)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read it: {e}") from None


def inspect_run(run_dir: str | Path, template: str | None = None) -> RunSource:
    """Read what ``run_dir`` holds (``finetune.run_dir.RunDir``); :class:`ExportError` if it is neither a run with an
    adapter nor a model, or a run that did not finish.

    The template is ``template`` if given, else the run's ``data.template``, else the one recorded by an earlier
    export, else ``tokenizer`` (the tokenizer's own ``chat_template``).
    """
    from .config import ConfigError
    from .run_dir import ADAPTER_CONFIG, RUN_STATE, RunDir
    from .templates import template_class

    path = Path(run_dir).resolve()
    if not path.is_dir():
        raise ExportError(f"{run_dir} is not a directory; expected a run directory such as runs/sft")
    try:
        run = RunDir.read(path)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    previous = _read_json(path / METADATA_FILE) if (path / METADATA_FILE).is_file() else {}
    if run.kind is None:
        raise ExportError(
            f"{run_dir} holds neither a PEFT adapter (adapter_config.json + adapter_model.safetensors) nor a model "
            f"(config.json + model.safetensors); is it a finished run directory?"
        )
    if not run.finished:
        raise ExportError(f"{run_dir}: that run did not finish ({RUN_STATE} says {run.state.get('status')!r}); "
                          f"resume it with --resume, then export")
    has_adapter = run.kind == "adapter"
    model_cfg = run.config.get("model") or {}
    base = run.model_name or previous.get("base_model")
    init = run.init
    adapter_base = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path") if has_adapter else None
    if has_adapter and init and (run.base_model == init or base == init or adapter_base == str(Path(init))):
        # From a full fine-tune: the adapter trained on those weights.
        if not Path(init).exists():
            raise ExportError(f"{run_dir} trained its adapter on {init} (its --init), which is not there; run the "
                              f"export from the directory the run was started in")
        base = str(Path(init).resolve())
    if has_adapter:
        base = base or adapter_base
        if not base:
            raise ExportError(f"{run_dir}: no base model named in config.yaml (model.name) or adapter_config.json")
    method = run.method or previous.get("adapter_method") or ("lora" if has_adapter else "full")
    if method == "full" and has_adapter:
        method = "lora"
    name = template or run.template or previous.get("template") or "tokenizer"
    try:
        template_class(name)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return RunSource(
        path=path,
        has_adapter=has_adapter,
        base_model=base,
        method=method,
        template=name,
        attn_implementation=model_cfg.get("attn_implementation") or "auto",
        config=run.config,
    )


def _torch_dtype(name: str | None):
    from .models import resolve_dtype

    return "auto" if name is None else resolve_dtype(name)  # None: the checkpoint's own dtype


def load_tokenizer_and_template(source: RunSource):
    """``(tokenizer, template, stop_ids)`` from the run directory (its tokenizer carries the chat template)."""
    from .config import ConfigError
    from .models import load_tokenizer
    from .templates import TemplateError, get_template, stop_token_ids

    try:
        tokenizer = load_tokenizer(str(source.path))
        template = get_template(source.template, tokenizer)
        stops = stop_token_ids(template, tokenizer)
    except (OSError, TemplateError, ConfigError) as e:
        raise ExportError(f"{source.path}: {' '.join(str(e).split())}") from None
    return tokenizer, template, stops


def load_model(source: RunSource, dtype: str | None = None, merge: bool = True):
    """The run's model in ``dtype`` (None: the checkpoint's own), the adapter merged in when ``merge``.

    For an adapter run the base is always loaded unquantised, whatever the run trained on (QLoRA's 4-bit NF4 base
    included): merging adds ``B @ A * alpha / r`` to the base weights, which 4-bit storage would round away.
    """
    from transformers import AutoModelForCausalLM

    from .kernels import resolve_attn_implementation
    from .models import resolve_model

    torch_dtype = _torch_dtype(dtype)
    if not source.has_adapter:
        try:
            return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype).eval()
        except OSError as e:
            raise ExportError(f"cannot load the model in {source.path}: {' '.join(str(e).split())}") from None
    try:
        base = AutoModelForCausalLM.from_pretrained(
            resolve_model(source.base_model),
            dtype=torch_dtype,
            attn_implementation=resolve_attn_implementation(source.attn_implementation, torch_dtype),
        )
    except OSError as e:
        raise ExportError(f"cannot load the base model {source.base_model!r}: {' '.join(str(e).split())}") from None
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, source.path)
    return (model.merge_and_unload(progressbar=True) if merge else model).eval()  # PEFT's bar, one step per layer


def _write_generation_config(source: RunSource, out: Path, tokenizer, stops: list[int], model=None) -> None:
    """The run's generation settings (or the model's), with ``eos_token_id`` = the template's stop tokens."""
    from transformers import GenerationConfig

    if (source.path / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(source.path)
    elif model is not None and getattr(model, "generation_config", None) is not None:
        config = model.generation_config
    else:
        config = GenerationConfig()
    config.eos_token_id = list(stops)
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config.use_cache = True  # training switches the KV cache off at run time; whoever runs the export wants it
    config.save_pretrained(out)


def sentencepiece_model(source: RunSource) -> Path | None:
    """The SentencePiece ``tokenizer.model`` of the run or of its base model directory, if either has one.

    A GGUF of a SentencePiece vocabulary takes its piece scores from it (see :func:`gguf_writer.tokenizer_vocab`);
    transformers' ``save_pretrained`` writes only ``tokenizer.json``, so a run directory rarely holds it itself.
    """
    from .models import resolve_model

    candidates = [source.path]
    if source.base_model:
        candidates.append(Path(resolve_model(source.base_model)))
    for directory in candidates:
        if (directory / SENTENCEPIECE_FILE).is_file():
            return directory / SENTENCEPIECE_FILE
    return None


def _save_tokenizer(source: RunSource, out: Path, tokenizer, template, stops: list[int], model=None) -> None:
    from .templates import save_with_template

    save_with_template(tokenizer, template, out)
    _write_generation_config(source, out, tokenizer, stops, model)
    spm = sentencepiece_model(source)
    if spm is not None:  # so a GGUF exported later from this export still gets the file's scores
        shutil.copy2(spm, out / SENTENCEPIECE_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def toolkit_version() -> str:
    """This package's version (from its installed metadata, else its ``pyproject.toml``)."""
    from importlib import metadata

    try:
        return metadata.version("finetune")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except (ImportError, OSError, KeyError, ValueError):
        return "unknown"


def starts_with_bos(template, tokenizer) -> bool:
    """Whether the template's text begins with the tokenizer's BOS (then llama.cpp and Ollama add it themselves)."""
    probe = [{"role": "user", "content": "Hi"}]
    bos = tokenizer.bos_token
    return bool(bos) and template.text(probe, add_generation_prompt=True).startswith(bos)


# ------------------------------------------------------------------------------------------------------------ Ollama


def _go(text: str) -> str:
    """A Go string literal (JSON's escapes are Go's; non-ASCII stays as UTF-8)."""
    return json.dumps(text, ensure_ascii=False)


def _check_literal(text: str, what: str) -> str:
    if "{{" in text or "}}" in text or '"""' in text:
        raise ExportError(f"{what} {text!r} cannot be written into a Modelfile template")
    return text


def ollama_template(template, tokenizer) -> str:
    """The run's chat template as an Ollama ``TEMPLATE`` (Go ``text/template`` over ``.Messages``).

    It renders the same text as ``template.text(messages, add_generation_prompt=True)`` for a conversation ending on a
    user turn, and as ``template.text(messages)`` for one ending on an assistant turn, with two differences Go
    templates cannot avoid: a leading BOS is left out where the template starts with one (Ollama prepends it, as the
    GGUF says ``add_bos_token``), and message contents are used as given (llama3 and llama2 strip surrounding
    whitespace, which Go templates cannot; Ollama passes contents untrimmed). Alpaca is single-turn and renders the
    no-input prompt (a user message containing a blank line is not split into instruction and input).

    Only ``if``/``else``/``range``/``end``, variables, ``eq``/``ne``/``not``/``and`` and fields are used, so the
    tests' small renderer executes exactly these templates.
    """
    from .templates import AlpacaTemplate, ChatMLTemplate, Llama2Template, Llama3Template, VicunaTemplate

    bos = _check_literal(getattr(template, "bos_token", None) or tokenizer.bos_token or "", "BOS token")
    eos = _check_literal(getattr(template, "eos_token", ""), "EOS token")
    if isinstance(template, Llama3Template):
        return (
            '{{- $last := "" }}\n'
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
            "{{ .Content }}<|eot_id|>\n"
            "{{- $last = .Role }}\n"
            "{{- end }}\n"
            '{{- if ne $last "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n'
            "{{ end }}"
        )
    if isinstance(template, ChatMLTemplate):
        return (
            '{{- $last := "" }}\n'
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
            "{{ .Content }}<|im_end|>\n"
            "{{ $last = .Role }}\n"
            "{{- end }}\n"
            '{{- if ne $last "assistant" }}<|im_start|>assistant\n'
            "{{ end }}"
        )
    if isinstance(template, Llama2Template):
        return (
            '{{- $system := "" }}\n'
            "{{- $first := true }}\n"
            "{{- range .Messages }}\n"
            '{{- if eq .Role "system" }}{{ $system = .Content }}\n'
            '{{- else if eq .Role "user" }}\n'
            f"{{{{- if not $first }}}}{bos}{{{{ end }}}}[INST] {{{{ if and $first $system }}}}<<SYS>>\n"
            "{{ $system }}\n"
            "<</SYS>>\n\n"
            "{{ end }}{{ .Content }} [/INST]\n"
            "{{- $first = false }}\n"
            f"{{{{- else }}}} {{{{ .Content }}}} {eos}\n"
            "{{- end }}\n"
            "{{- end }}"
        )
    if isinstance(template, VicunaTemplate):
        from .templates import VICUNA_SYSTEM

        return (
            f"{{{{- $system := {_go(VICUNA_SYSTEM)} }}}}\n"
            '{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}\n'
            '{{- $last := "" }}\n'
            '{{- $system }}{{ " " }}\n'
            "{{- range .Messages }}\n"
            '{{- if eq .Role "user" }}USER: {{ .Content }}{{ " " }}\n'
            f'{{{{- else if eq .Role "assistant" }}}}ASSISTANT: {{{{ .Content }}}}{eos}\n'
            "{{- end }}\n"
            "{{- $last = .Role }}\n"
            "{{- end }}\n"
            '{{- if ne $last "assistant" }}ASSISTANT:{{ end }}'
        )
    if isinstance(template, AlpacaTemplate):
        from .templates import ALPACA_PREAMBLE_NO_INPUT

        return (
            f"{{{{- $preamble := {_go(ALPACA_PREAMBLE_NO_INPUT)} }}}}\n"
            '{{- range .Messages }}{{ if eq .Role "system" }}{{ $preamble = .Content }}{{ end }}{{ end }}\n'
            "{{- range .Messages }}\n"
            '{{- if eq .Role "user" }}{{ $preamble }}\n\n'
            "### Instruction:\n"
            "{{ .Content }}\n\n"
            "### Response:\n"
            f'{{{{- else if eq .Role "assistant" }}}}{{{{ .Content }}}}{eos}\n'
            "{{- end }}\n"
            "{{- end }}"
        )
    raise ExportError(
        f"no Ollama template for chat template {template.name!r}; export with --template llama3, llama2, chatml, "
        f"vicuna_v1.1 or alpaca, or use --to gguf (llama.cpp reads the jinja template from the GGUF)"
    )


def modelfile(template, tokenizer, gguf_name: str = GGUF_FILE, system: str | None = None) -> str:
    """An Ollama ``Modelfile``: ``FROM`` the GGUF, the ``TEMPLATE``, one ``PARAMETER stop`` per stop token."""
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{ollama_template(template, tokenizer)}"""', ""]
    for stop in template.stop_strings:
        lines.append(f"PARAMETER stop {_go(_check_literal(stop, 'stop token'))}")
    if system:
        lines += ["", f'SYSTEM """{_check_literal(system, "system message")}"""']
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------ export


def _check_dtype(to: str, dtype: str | None) -> str | None:
    from .gguf_writer import GGUF_DTYPES

    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; expected one of {', '.join(FORMATS)}")
    if to == "adapter":
        if dtype is not None:
            raise ExportError("--dtype does not apply to --to adapter (the adapter is copied as trained)")
        return None
    if to == "merged":
        if dtype is not None and dtype not in MERGED_DTYPES:
            raise ExportError(f"--to merged takes --dtype {', '.join(MERGED_DTYPES)}; got {dtype!r}")
        return dtype
    if dtype is None:
        return "f16"
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"--to {to} takes --dtype {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    return dtype


def check_gguf_source(source: RunSource, tokenizer) -> None:
    """Refuse, before any weight is loaded, a tokenizer or model architecture the GGUF writer cannot express.

    Reads only the tokenizer (already loaded) and the model's ``config.json``, so a refusal takes a second, not the
    load and merge of the whole model.
    """
    from transformers import AutoConfig

    from .gguf_writer import GGUFExportError, check_llama, gguf_tokenizer_kind
    from .models import resolve_model

    where = source.path if not source.has_adapter else resolve_model(source.base_model)
    try:
        gguf_tokenizer_kind(tokenizer)
        check_llama(AutoConfig.from_pretrained(where))
    except GGUFExportError as e:
        raise ExportError(f"{source.path}: {e}") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the model config of {where}: {' '.join(str(e).split())}") from None


def _write_gguf(source, out: Path, tokenizer, template, stops, dtype: str) -> Path:
    from .gguf_writer import GGUFExportError, write_llama_gguf

    model = load_model(source, "float32" if dtype == "f32" else None)
    name = Path(source.base_model).name if source.base_model else source.path.name
    try:
        return write_llama_gguf(
            out / GGUF_FILE,
            model,
            tokenizer,
            dtype=dtype,
            chat_template=template.jinja,
            stop_token_ids=stops,
            add_bos_token=starts_with_bos(template, tokenizer),
            name=f"{name}-{source.path.name}",
            sentencepiece_model=sentencepiece_model(source),
        )
    except GGUFExportError as e:
        raise ExportError(str(e)) from None


def _build(source: RunSource, to: str, out: Path, dtype: str | None, system: str | None, tokenizer, template, stops):
    """Write the export into ``out`` (an empty directory); returns the weight files written."""
    from .model_card import record_base_model

    if to == "ollama":
        ollama_template(template, tokenizer)  # a template with no Ollama form fails before the model is loaded
    if to in ("gguf", "ollama"):
        check_gguf_source(source, tokenizer)
    if to == "adapter":
        if not source.has_adapter:
            raise ExportError(f"{source.path} is a full fine-tune with no adapter; use --to merged")
        weights = []
        for name in ADAPTER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, out / name)
                if name != "adapter_config.json":
                    weights.append(out / name)
        # The base as the user named it (an older run recorded the absolute directory it was loaded from).
        record_base_model(out, (source.config.get("model") or {}).get("name") or source.base_model)
        _save_tokenizer(source, out, tokenizer, template, stops)
        return weights
    if to == "merged":
        model = load_model(source, dtype)
        model.config.use_cache = True  # a full fine-tune saved its config with the cache off, as it trained
        model.save_pretrained(out)
        _save_tokenizer(source, out, tokenizer, template, stops, model)
        return sorted(out.glob("*.safetensors"))
    gguf_path = _write_gguf(source, out, tokenizer, template, stops, dtype)
    if to == "ollama":
        (out / MODELFILE).write_text(modelfile(template, tokenizer, gguf_path.name, system))
    return [gguf_path]


def export(
    run_dir: str | Path,
    to: str,
    out: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    template: str | None = None,
    system: str | None = None,
) -> Path:
    """Export ``run_dir`` as ``to`` into ``out``; returns ``out``. See the module docstring for the formats.

    Raises:
        ExportError: a bad run directory, format, dtype or template, a base model that cannot be loaded, or an
            existing ``out`` without ``overwrite``. Nothing is left at ``out`` when anything fails.
    """
    from .model_card import write_model_card

    dtype = _check_dtype(to, dtype)
    out = Path(out).resolve()
    if system is not None and to != "ollama":
        raise ExportError("--system applies to --to ollama (the Modelfile's SYSTEM)")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    source = inspect_run(run_dir, template)
    if out == source.path or source.path.is_relative_to(out):
        raise ExportError(f"--out {out} would replace the run directory itself")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tokenizer, tpl, stops = load_tokenizer_and_template(source)
        weights = _build(source, to, staging, dtype, system, tokenizer, tpl, stops)
        metadata = {
            "format": to,
            "base_model": source.base_model,
            "run_dir": str(source.path),
            "adapter_method": source.method,
            "template": source.template,
            "stop_tokens": list(tpl.stop_strings),
            "stop_token_ids": stops,
            "dtype": dtype or ("adapter" if to == "adapter" else "checkpoint"),
            "toolkit_version": toolkit_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "weights": [{"file": p.name, "sha256": _sha256(p), "bytes": p.stat().st_size} for p in weights],
        }
        if to == "merged" and dtype is None:
            metadata["dtype"] = str(json.loads((staging / "config.json").read_text()).get("dtype", "unknown"))
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        write_model_card(staging, final_path=out)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``finetune export``'s arguments."""
    parser.add_argument("run_dir", help="a run directory (config.yaml + adapter or full model) or a model directory")
    parser.add_argument("--to", required=True, help=f"output format: {', '.join(FORMATS)}")
    parser.add_argument(
        "--out",
        default=None,
        help="directory to create (default: RUN_DIR-FORMAT beside the run; replaced only with --overwrite)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="merged: float32, float16 or bfloat16 (default: the base's); gguf/ollama: f32, f16 (default) or q8_0",
    )
    parser.add_argument("--template", default=None, help="chat template to export with (default: the run's)")
    parser.add_argument("--system", default=None, help="ollama: a default system message (the Modelfile's SYSTEM)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    """Run ``finetune export``; a user error prints ``error: ...`` and returns 2."""
    out = args.out or f"{Path(args.run_dir).resolve()}-{args.to}"
    try:
        out = export(args.run_dir, args.to, out, args.dtype, args.overwrite, args.template, args.system)
    except ExportError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    metadata = json.loads((out / METADATA_FILE).read_text())
    files = ", ".join(w["file"] for w in metadata["weights"])
    print(f"exported {args.run_dir} as {args.to} ({metadata['dtype']}) to {out}: {files}")
    if args.to == "ollama":
        print(f"run it: cd {out} && ollama create my-model -f {MODELFILE} && ollama run my-model")
    elif args.to == "gguf":
        print(f"run it: llama-cli -m {out / GGUF_FILE} -cnv")
    return 0
