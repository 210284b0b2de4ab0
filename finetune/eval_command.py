"""``finetune eval``: lm-evaluation-harness tasks, the verifier suite and held-out loss on a run, one table and a JSON.

    finetune eval runs/sft                                    # the bundled finetune_suite task + suite + loss
    finetune eval runs/sft --tasks finetune_suite,arc_easy --limit 100 --out runs/sft/eval.json
    finetune eval exports/sft-merged --tasks none             # our suite and loss only (no lm-eval needed)

The model is loaded once, as ``finetune chat`` loads it (a run's adapter merged into its base, a merged export, or a
model name), and the same weights go to all three:

- lm-eval's HF backend (``lm_eval.models.huggingface.HFLM`` around the loaded model, ``simple_evaluate``) with its
  task names, the run's chat template applied to each request (``--no_chat_template`` for raw text). The bundled
  task ``finetune_suite`` (``finetune/lm_eval_tasks/``: the suite's held-out prompts, right answer against a
  plausible wrong one) runs offline; other task names are lm-eval's own (they download their data sets).
- verifier accuracy of greedy answers (:func:`finetune.evaluate.verifier_accuracy`) on ``--data`` (default: the run's
  ``data.eval``, else the bundled suite's eval split), with ``--verifier`` (default ``auto``: the suite's checker on
  suite data);
- held-out loss (:func:`finetune.evaluate.eval_loss`) on the same data, rendered with the run's template.

lm-eval is the optional extra ``eval`` (``pip install 'finetune[eval]'``); without it only ``--tasks none`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""The bundled lm-eval task configs."""
DEFAULT_DATA = "bundled:suite_messages_eval.jsonl"


class EvalError(ValueError):
    """A user's mistake (lm-eval missing, an unknown task, bad data): one line, exit status 2."""


def bundled_tasks() -> list[str]:
    """The task names under :data:`TASKS_DIR` (one YAML each, named after its task)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def lm_eval_scores(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int, chat_template: bool) -> dict:
    """``{task: {metric: value}}`` from lm-eval's ``simple_evaluate`` on the loaded ``model`` (HF backend)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("lm-evaluation-harness is not installed: pip install 'finetune[eval]' (or pass --tasks none)"
                        ) from None
    bundled = set(bundled_tasks())
    # lm-eval indexes its ~200 task folders only when a task of its own is asked for.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= bundled)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task {', '.join(unknown)}; bundled: {', '.join(sorted(bundled))}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=False, apply_chat_template=chat_template)
    scores = {}
    for task, figures in results["results"].items():
        scores[task] = {key.split(",")[0]: value for key, value in figures.items()
                        if isinstance(value, (int, float)) and not key.startswith("sample_len") and "stderr" not in key}
        scores[task]["num_docs"] = figures.get("sample_len")
    return scores


def suite_scores(chat, data: str, verifier_spec: str | None, num_samples: int | None, max_new_tokens: int,
                 batch_size: int, max_length: int) -> dict:
    """Verifier accuracy of greedy answers and held-out loss of ``chat``'s model on ``data``."""
    from .config import resolve_verifier
    from .data import load_conversations, tokenize_conversations
    from .evaluate import eval_loss, load_callable, verifier_accuracy

    conversations = load_conversations(data, name="eval data")
    if not conversations:
        raise EvalError(f"{data}: no conversations to evaluate on")
    scores: dict = {"data": data}
    rows, report = tokenize_conversations(conversations, chat.template, chat.tokenizer, max_length)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else chat.stop_ids[0]
    scores["eval_loss"] = eval_loss(chat.model, rows, pad) if rows else None
    scores["eval_loss_rows"] = len(rows)
    spec = resolve_verifier(verifier_spec, data)
    if spec:
        try:
            verifier = load_callable(spec)
        except ValueError as e:
            raise EvalError(f"--verifier: {e}") from None
        prompts = conversations[:num_samples] if num_samples else conversations
        result = verifier_accuracy(chat.model, chat.tokenizer, chat.template, prompts, verifier, max_new_tokens,
                                   batch_size)
        scores.update(verifier=spec, verifier_accuracy=result.accuracy, verifier_prompts=result.num_prompts,
                      samples=result.samples)
    return scores


def table(report: dict) -> str:
    """The figures as one table: figure, value, where it comes from."""
    rows = []
    for task, figures in (report.get("lm_eval") or {}).items():
        for metric, value in figures.items():
            if metric != "num_docs":
                rows.append((f"{task} {metric}", value, f"lm-eval, {figures.get('num_docs')} docs"))
    suite = report.get("suite") or {}
    if "verifier_accuracy" in suite:
        rows.append(("verifier accuracy", suite["verifier_accuracy"], f"{suite['verifier_prompts']} prompts"))
    if suite.get("eval_loss") is not None:
        rows.append(("held-out loss", suite["eval_loss"], f"{suite['eval_loss_rows']} conversations"))
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'figure':<{width}}  {'value':>8}  source", f"{'-' * width}  {'-' * 8}  {'-' * 6}"]
    lines += [f"{name:<{width}}  {value:>8.4f}  {source}" for name, value, source in rows]
    return "\n".join(lines)


def evaluate_model(name_or_dir: str, tasks: list[str], data: str | None = None, verifier: str | None = "auto",
                   limit: int | None = None, num_samples: int | None = 200, max_new_tokens: int = 32,
                   batch_size: int = 16, chat_template: bool = True, suite: bool = True,
                   template: str | None = None) -> dict:
    """Everything ``finetune eval`` measures, as the JSON it writes (module docstring)."""
    from .chat import load_chat_model
    from .run_dir import RunDir

    chat = load_chat_model(name_or_dir, template)
    run = RunDir.read(name_or_dir) if Path(name_or_dir).is_dir() else None
    run_data = ((run.config.get("data") or {}) if run else {})
    report: dict = {"model": str(name_or_dir), "template": chat.template.name}
    if tasks:
        # lm-eval renders through the tokenizer's chat_template: make it the template we render with (a run's tokenizer
        # already carries it; a model name's may have none, or another).
        chat.tokenizer.chat_template = chat.template.jinja
        report["lm_eval"] = lm_eval_scores(chat.model, chat.tokenizer, tasks, limit, batch_size, chat_template)
        report["lm_eval_settings"] = {"backend": "hf", "limit": limit, "apply_chat_template": chat_template}
    if suite:
        report["suite"] = suite_scores(chat, data or run_data.get("eval") or DEFAULT_DATA, verifier, num_samples,
                                       max_new_tokens, batch_size, int(run_data.get("max_length") or 256))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``finetune eval``'s arguments."""
    parser.add_argument("model", help="a run directory, a model directory (e.g. a merged export), or a model name")
    parser.add_argument("--tasks", default="finetune_suite",
                        help="lm-eval task names, comma-separated (default: the bundled finetune_suite); none to skip")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many documents per task")
    parser.add_argument("--no_chat_template", dest="chat_template", action="store_false",
                        help="lm-eval: score raw text instead of the run's chat template")
    parser.add_argument("--data", default=None, help="held-out conversations for the suite and the loss (default: "
                        "the run's data.eval, else bundled:suite_messages_eval.jsonl)")
    parser.add_argument("--verifier", default="auto", help="module:function (prompt, response) -> bool; auto: the "
                        "suite's checker on suite data; none to skip")
    parser.add_argument("--num_samples", type=int, default=200, help="prompts answered for verifier accuracy")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="longest greedy answer")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch")
    parser.add_argument("--no_suite", dest="suite", action="store_false", help="skip verifier accuracy and loss")
    parser.add_argument("--template", default=None, help="chat template (default: the run's or the model's own)")
    parser.add_argument("--out", default=None, help="the JSON to write (default: MODEL/eval.json for a directory)")


def run(args: argparse.Namespace) -> int:
    """Run ``finetune eval``: print the table, write the JSON; a user error prints ``error: ...`` and returns 2."""
    from .export import ExportError
    from .model_card import CARD_FILE, write_model_card

    tasks = [] if args.tasks.strip().lower() in ("", "none") else [t.strip() for t in args.tasks.split(",") if t.strip()]
    verifier = None if args.verifier == "none" else args.verifier
    if not tasks and not args.suite:
        print("error: nothing to evaluate (--tasks none and --no_suite)", file=sys.stderr)
        return 2
    try:
        report = evaluate_model(args.model, tasks, args.data, verifier, args.limit, args.num_samples,
                                args.max_new_tokens, args.batch_size, args.chat_template, args.suite, args.template)
    except (EvalError, ExportError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(args.model) / "eval.json" if Path(args.model).is_dir() else None)
    print(table(report))
    if out is not None:
        from .runs import atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    if args.out is None and Path(args.model).is_dir() and (Path(args.model) / CARD_FILE).is_file():
        write_model_card(args.model)  # the card lists the figures just measured
    return 0
