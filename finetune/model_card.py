"""The model card (``README.md``) of a run or an export, and the base-model name an adapter records.

Every finished run and every export gets a ``README.md`` written from what the directory holds (``RunDir``,
``summary.json``, ``export_metadata.json``): the base model as the user named it, the data, the chat template and its
stop tokens, the chain of stages that led here (each run's ``--init``), the run's figures and how to load it. Its
YAML header is ``huggingface_hub.ModelCardData``, so the hub shows the base model and library. It replaces PEFT's
default card ("fine-tuned version of [None]"), which knows none of this.

``adapter_config.json``'s ``base_model_name_or_path`` is the ``model.name`` the user gave (``tiny``, a hub id, or a
directory as it was typed), not the absolute directory transformers loaded it from: that path means nothing on
another machine, and ``RunDir``, ``--init`` and ``finetune export`` read the base from ``config.yaml`` anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from .run_dir import ADAPTER_CONFIG, EXPORT_METADATA, RunDir, run_kind
from .tiny import TINY_NAME

CARD_FILE = "README.md"
AVERAGE_FILE = "average.json"
"""What the pipeline's average step writes beside the averaged adapter: the ``runs`` it averages and how."""
EVAL_FILE = "eval.json"
"""What ``finetune eval`` writes into a run or export directory; its figures join the card's."""
PEFT_DEFAULT_CARD_MARK = "[More Information Needed]"
"""What PEFT's (and transformers') default model card is full of; such a card is ours to replace."""
MAX_CHAIN = 16
"""Longest ``--init`` chain followed (a loop of hand-edited configs must not hang the card)."""


def record_base_model(directory: str | Path, name: str) -> None:
    """Set ``base_model_name_or_path`` to ``name`` in every ``adapter_config.json`` under ``directory`` (the run's
    adapter, PPO's ``value/``), and drop the default cards PEFT wrote beside them (the run's own card replaces them)."""
    from .runs import atomic_write_text

    for path in sorted(Path(directory).rglob(ADAPTER_CONFIG)):
        config = json.loads(path.read_text())
        if config.get("base_model_name_or_path") != name:
            atomic_write_text(path, json.dumps({**config, "base_model_name_or_path": name}, indent=2, sort_keys=True) + "\n")
        card = path.parent / CARD_FILE
        if card.is_file() and PEFT_DEFAULT_CARD_MARK in card.read_text():
            card.unlink()


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a hub repository id (``owner/name``) rather than a local directory or ``tiny``."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def stage_chain(run: RunDir, shown_path: str | Path | None = None) -> list[str]:
    """``["dpo (runs/dpo)", "sft (runs/sft)", "base tiny"]``: this run (named ``shown_path`` if it is still staged),
    then each ``--init`` it started from, as far as those directories can still be read (relative paths are the
    run's own, as typed where it was started)."""
    chain, seen, current = [], set(), run
    while current is not None and len(chain) < MAX_CHAIN:
        chain.append(f"{current.stage or 'model'} ({shown_path if current is run and shown_path else current.path})")
        averaged = averaged_runs(current.path)
        if averaged:  # an average's config.yaml is its first run's, so the chain goes on from that run's init
            chain.append("mean of " + ", ".join(f"{r.stage or 'model'} ({r.path})" for r in averaged))
        seen.add(str(Path(current.path).resolve()))
        init = current.init
        if not init:
            break
        if not Path(init).is_dir() or str(Path(init).resolve()) in seen:
            chain.append(f"init {init} (not readable from here)")
            return chain
        current = RunDir.read(init)
    base = run.base_model
    if base:
        chain.append(f"base {base}")
    return chain


def read_average(directory: str | Path) -> dict:
    """A pipeline average's ``average.json`` (the averaged ``directories``, the ``runs`` they are of, ``combination``
    and ``rank``); ``{}`` for any other directory."""
    path = Path(directory) / AVERAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def averaged_runs(directory: str | Path) -> list[RunDir]:
    """The runs a pipeline average is the mean of, as far as they can still be read."""
    return [RunDir.read(run) for run in read_average(directory).get("runs", []) if Path(run).is_dir()]


def flat_figures(summary: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Every number and short string in ``summary.json``, nested keys joined with dots (lists are left out)."""
    rows = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flat_figures(value, f"{name}.")
        elif isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 80 and not value.startswith("/")):
            # (an absolute path, such as the resolved base's directory, says nothing on another machine)
            rows.append((name, value))
    return rows


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _stop_tokens(path: Path, template_name: str | None) -> list[str]:
    from .models import load_tokenizer
    from .templates import get_template

    if not template_name or not (path / "tokenizer_config.json").is_file():
        return []
    return list(get_template(template_name, load_tokenizer(str(path))).stop_strings)


def model_card(directory: str | Path, stop_tokens: list[str] | None = None, final_path: str | Path | None = None) -> str:
    """The ``README.md`` text for a run or export directory (module docstring). ``stop_tokens``: the template's, when
    the caller has them (else read through the directory's tokenizer); ``final_path``: where the directory will be
    once it is renamed into place, if it is still a staging directory."""
    from huggingface_hub import ModelCardData

    path = Path(directory)
    metadata = json.loads((path / EXPORT_METADATA).read_text()) if (path / EXPORT_METADATA).is_file() else {}
    run = RunDir.read(path)
    source = RunDir.read(metadata["run_dir"]) if metadata.get("run_dir") and Path(metadata["run_dir"]).is_dir() else run
    config = source.config
    data = config.get("data") or {}
    fmt = metadata.get("format")
    kind = run.kind or run_kind(path)
    base = source.base_model or metadata.get("base_model")
    template = metadata.get("template") or source.template
    stops = metadata.get("stop_tokens") or stop_tokens or _stop_tokens(path, template)
    summary_path = source.path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    stage = source.stage or "model"
    library = "peft" if kind == "adapter" else "transformers" if kind == "full" else None
    tags = ["finetune", stage] + ([fmt] if fmt else []) + (["gguf"] if fmt in ("gguf", "ollama") else [])
    datasets = [d for d in (data.get("train"), data.get("eval")) if is_hub_id(d)]
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name=library,
        tags=list(dict.fromkeys(tags)),
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    shown = Path(final_path) if final_path is not None else path
    title = f"{shown.name}: {stage} of {base}" + (f", exported as {fmt}" if fmt else "")
    lines = ["---", card_data.to_yaml(), "---", "", f"# {title}", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| what this is | {_what(kind, fmt, metadata, read_average(source.path))} |",
        f"| training data | `{data.get('train')}` (format {data.get('format', 'auto')}) |",
        f"| eval data | `{data.get('eval')}` |",
        f"| chat template | `{template}` |",
        f"| stop tokens | {', '.join(f'`{s}`' for s in stops) or '-'} |",
        f"| adapter method | {(config.get('adapter') or {}).get('method') or metadata.get('adapter_method') or '-'} |",
        "",
        "## Stages",
        "",
        " <- ".join(f"`{step}`" for step in ([f"export {fmt} ({shown})"] if fmt else [])
                   + stage_chain(source, None if fmt else shown)),
        "",
    ]
    figures = flat_figures(summary)
    evaluation = path / EVAL_FILE if (path / EVAL_FILE).is_file() else source.path / EVAL_FILE
    if evaluation.is_file():  # what `finetune eval` measured: lm-eval's tasks, the verifier suite, held-out loss
        report = json.loads(evaluation.read_text())
        figures += flat_figures({"finetune_eval": {**(report.get("lm_eval") or {}), **{
            k: v for k, v in (report.get("suite") or {}).items() if k in ("verifier_accuracy", "eval_loss")}}})
    if figures:
        lines += ["## Figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {name} | {_figure(value)} |" for name, value in figures]
        lines.append("")
    lines += ["## Use", "", _usage(kind, fmt, base), ""]
    lines += ["Written by the `finetune` toolkit from the run's `config.yaml`, `summary.json` and "
              "`export_metadata.json`; generation stops at the stop tokens above (`generation_config.json`)."]
    return "\n".join(lines) + "\n"


def _what(kind, fmt, metadata, average: dict) -> str:
    if fmt:
        return f"{fmt} export ({metadata.get('dtype')}) of `{metadata.get('run_dir')}`"
    if average:
        return (f"a LoRA adapter: the mean of {len(average.get('directories', []))} adapters' merged weight deltas "
                f"(`{average.get('combination')}`, rank {average.get('rank')}) from "
                + ", ".join(f"`{run}`" for run in average.get("runs", [])))
    return {"adapter": "a LoRA adapter", "full": "full model weights"}.get(kind, "a run without weights of its own")


def _usage(kind, fmt, base) -> str:
    if fmt in ("gguf", "ollama"):
        return ("```\nllama-cli -m model.gguf -cnv        # llama.cpp reads the chat template from the GGUF\n"
                + ("ollama create my-model -f Modelfile\n" if fmt == "ollama" else "") + "```")
    if kind == "adapter":
        load = f"{base!r}" if base != TINY_NAME else "resolve_model('tiny')"  # the embedded model ships with finetune
        imports = "from finetune.models import resolve_model\n" if base == TINY_NAME else ""
        return (f"```python\n{imports}from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"base = AutoModelForCausalLM.from_pretrained({load})\nmodel = PeftModel.from_pretrained(base, "
                f"'THIS_REPO')\ntokenizer = AutoTokenizer.from_pretrained('THIS_REPO')  # carries the chat template\n```")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained('THIS_REPO')\n"
            "tokenizer = AutoTokenizer.from_pretrained('THIS_REPO')  # carries the chat template\n```")


def write_model_card(directory: str | Path, stop_tokens: list[str] | None = None,
                     final_path: str | Path | None = None) -> Path:
    """Write :func:`model_card` into ``directory/README.md`` (atomically); returns the path."""
    from .runs import atomic_write_text

    path = Path(directory) / CARD_FILE
    atomic_write_text(path, model_card(directory, stop_tokens, final_path))
    return path
