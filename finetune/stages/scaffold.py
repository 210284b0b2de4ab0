"""The shared part of every stage: one order of set-up and teardown around what each stage supplies.

A stage (``sft``, ``reward``, ``dpo``, ``rejection_sampling``, ``ppo``) is a :class:`Stage`: how to resolve its config,
how to load its data, and how to train (build its model and roles, train, measure its figures, say how to save the
result). :func:`run_stage` does the rest, in this order:

1. validate and resolve the config (the stage's ``resolve``, by default :func:`finetune.run_dir.resolve_init`, then
   its ``check``: a TRL stage builds its trainer's arguments, the ``trainer`` pass-through section included);
2. load the tokenizer and chat template, then load and validate the data (the stage's ``load_data``): a typo in a
   data path or a file with no usable record fails here, before the output directory is touched;
3. only then prepare the output directory (:func:`finetune.runs.plan_output_dir`): a new one, an unfinished run with
   nothing to resume (restarted), ``--resume`` (incomplete checkpoints discarded, ``metrics.jsonl`` rewound to the
   checkpoint), or ``--overwrite`` (the previous run moved aside, and only if it is a run this toolkit wrote and holds
   none of this run's inputs); then ``config.yaml`` and ``run.json`` (``running``);
4. train (the stage's ``train``);
5. save into a staging directory, then rename into place: the model or adapter (the stage's ``save``), the
   tokenizer with the chat template and a generation config whose stop ids are the template's (``use_cache`` on:
   training turns the cache off on the live model only);
6. ``summary.json``, ``loss.png``, the model card ``README.md`` (:mod:`finetune.model_card`), and last ``run.json``
   with ``finished``, which ``--init``, ``finetune export`` and ``finetune chat`` require.

If anything raises after step 3, an ``--overwrite``-replaced run is put back; whatever the failed run left (an
unfinished run directory) does not block the corrected rerun.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data import write_rejects
from ..model_card import record_base_model, write_model_card
from ..run_dir import RunDir, resolve_init, run_kind, write_run_state
from ..runs import (
    apply_output_dir,
    plan_output_dir,
    plot_loss,
    process_state,
    publish,
    run_inputs,
    write_config,
    write_summary,
)

FINAL_STAGING = ".final-staging"
"""Where the final artefacts are written before they are renamed into the run directory."""


@dataclass
class StageData:
    """What a stage's ``load_data`` returns: its data, in whatever shape its ``train`` takes, and the lines that
    report it (printed once the run directory exists)."""

    data: object
    report: list[str] = field(default_factory=list)
    loads: list = field(default_factory=list)
    """The ``data_formats.LoadReport`` of each load, whose skipped records (``data.skip_invalid``) are listed in
    ``OUTPUT_DIR/rejects.jsonl``."""


@dataclass
class StageRun:
    """What a stage's ``train`` gets: the resolved config and everything the scaffold has set up."""

    cfg: object
    init: RunDir | None
    tokenizer: object
    template: object
    data: object
    output_dir: Path
    state: object
    """accelerate's ``PartialState``."""
    resume: bool
    """Continue from the newest complete checkpoint in ``output_dir`` (``--resume``)."""

    @property
    def main(self) -> bool:
        return self.state.is_main_process


@dataclass
class Trained:
    """What a stage's ``train`` returns."""

    summary: dict
    save: Callable[[Path], None] | None = None
    """Write the model or adapter into the directory given (called on every process, as ``Trainer.save_model``
    wants); ``None`` when the stage leaves no model of its own."""
    model_config: object | None = None
    """The trained model's ``config``, for the generation config; ``None`` leaves the tokenizer unsaved."""
    model: object = None
    """The trained model or roles, for the caller of :func:`run_stage`."""


@dataclass
class Stage:
    """A stage's own parts (see the module docstring)."""

    name: str
    load_data: Callable[[object, object, object], StageData]
    """``(cfg, tokenizer, template) -> StageData``; raises a one-line error for unusable data."""
    train: Callable[[StageRun], Trained]
    resolve: Callable[[object], tuple[object, RunDir | None, list[str]]] = resolve_init
    """``cfg -> (cfg, init run, adapter fields taken from it)``."""
    seed: Callable[[object], int] = lambda cfg: cfg.train.seed
    has_progress: Callable[[Path], bool] | None = None
    """Whether an unfinished run in a directory has something to resume (default: a complete checkpoint)."""
    check: Callable[[object], None] | None = None
    """``cfg -> None``: what the resolved config needs more than its dataclasses to check (a TRL stage builds its
    trainer's arguments with the ``trainer`` pass-through section); raises a one-line ``ConfigError``. Called
    before the data loads and the output directory is touched."""


def run_stage(cfg, stage: Stage) -> Trained:
    """Run ``stage`` on ``cfg`` in the scaffold's order (module docstring); returns what its ``train`` returned."""
    from transformers import set_seed

    from ..models import load_tokenizer
    from ..templates import get_template

    state = process_state()
    main = state.is_main_process
    cfg, init, changed = stage.resolve(cfg)
    if stage.check is not None:
        stage.check(cfg)
    tokenizer = load_tokenizer(cfg.model.name)
    template = get_template(cfg.data.template, tokenizer)
    loaded = stage.load_data(cfg, tokenizer, template)
    action = plan_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, run_inputs(cfg), stage.has_progress)
    state.wait_for_everyone()  # every process has decided before the main process changes anything
    output = apply_output_dir(cfg.output_dir, action, main, report_checkpoint=stage.has_progress is None)
    state.wait_for_everyone()
    try:
        if main:
            write_config(output.path, cfg)
            write_run_state(output.path, stage.name, "running")
            if changed:
                print(f"adapter {', '.join(changed)} taken from --init {cfg.init} (the run continues that adapter)")
            for line in loaded.report:
                print(line)
            write_rejects(output.path, loaded.loads)
        set_seed(stage.seed(cfg))
        trained = stage.train(StageRun(cfg, init, tokenizer, template, loaded.data, output.path, state, cfg.resume))
        save_final(output.path, trained, tokenizer, template, state, cfg.model.name)
        if main:
            write_summary(output.path, trained.summary)
            plot_loss(output.path, trained.summary)
            write_model_card(output.path, list(template.stop_strings))
            write_run_state(output.path, stage.name, "finished", run_kind(output.path))
        state.wait_for_everyone()
    except BaseException:
        if main:
            output.abandon()
        raise
    if main:
        output.commit()
    return trained


def save_final(output_dir: Path, trained: Trained, tokenizer, template, state, base_model: str | None = None) -> None:
    """The model or adapter, the tokenizer with the chat template and the generation config, written into
    ``output_dir/.final-staging`` and renamed into ``output_dir`` (:func:`finetune.runs.publish`).

    Every saved ``adapter_config.json`` names ``base_model`` (``model.name`` as the user gave it) instead of the
    absolute directory it was loaded from (:func:`finetune.model_card.record_base_model`)."""
    from ..templates import save_with_template

    staging = output_dir / FINAL_STAGING
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    state.wait_for_everyone()
    if trained.model_config is not None:
        trained.model_config.use_cache = True  # training is over; the saved config must not turn the cache off
    if trained.save is not None:
        trained.save(staging)
    state.wait_for_everyone()
    if state.is_main_process:
        if base_model is not None:
            record_base_model(staging, base_model)
        if trained.model_config is not None:
            save_with_template(tokenizer, template, staging, model_config=trained.model_config)
            keep_cache_on(staging)
        publish(staging, output_dir)
    state.wait_for_everyone()


def keep_cache_on(directory: Path) -> None:
    """``use_cache: true`` in the saved ``generation_config.json`` (and ``config.json``, if a model was saved), so
    plain ``generate()`` on the run or an export of it uses the KV cache."""
    import json

    from ..runs import atomic_write_text

    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            config = json.loads(path.read_text())
            if config.get("use_cache") is not True:
                atomic_write_text(path, json.dumps({**config, "use_cache": True}, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Parts the stages built on a TRL trainer (SFT, reward, DPO) share


@dataclass
class Rows:
    """Tokenised training and eval rows, what became of the records, and the eval records themselves."""

    train: list[dict]
    train_report: object
    eval: list[dict]
    eval_report: object | None
    eval_records: list


def load_rows(cfg, tokenizer, template, load: Callable, tokenize: Callable, tokenize_train: Callable | None = None
              ) -> StageData:
    """``data.train`` (and ``data.eval``) read with ``load`` (``finetune.data.load_conversations`` or
    ``load_preferences``) and tokenised with ``tokenize`` (the training records with ``tokenize_train``, if given);
    no training row left is a one-line error."""
    from ..config import ConfigError

    data, loads = cfg.data, []
    train_records = load(data.train, data.format, data.split, data.max_train_samples,
                         skip_invalid=data.skip_invalid, reports=loads, name="train data")
    train_rows, train_report = (tokenize_train or tokenize)(train_records, template, tokenizer, data.max_length)
    eval_records, eval_rows, eval_report = [], [], None
    if data.eval:
        eval_records = load(data.eval, data.format, data.eval_split, data.max_eval_samples,
                            skip_invalid=data.skip_invalid, reports=loads, name="eval data")
        eval_rows, eval_report = tokenize(eval_records, template, tokenizer, data.max_length)
    if not train_rows:
        raise ConfigError(f"no training rows left from {data.train}: {train_report.describe('train data')}")
    report = [train_report.describe("train data")] + ([eval_report.describe("eval data")] if eval_report else [])
    return StageData(Rows(train_rows, train_report, eval_rows, eval_report, eval_records), report, loads)


def trainer_inputs(run: StageRun) -> dict:
    """The datasets and tokenizer every TRL trainer takes, from a run's :class:`Rows`."""
    from datasets import Dataset

    rows: Rows = run.data
    return dict(train_dataset=Dataset.from_list(rows.train),
                eval_dataset=Dataset.from_list(rows.eval) if rows.eval else None,
                processing_class=run.tokenizer)


def train_with_trainer(run: StageRun, build: Callable[[list], object]):
    """Build a TRL trainer with the run's callbacks (``build(callbacks)``: the stage adds its own in front) and train
    it, resumably and stopping cleanly on a non-finite or diverged loss; returns ``(trainer, training figures)``."""
    from ..runs import NonFiniteLossCallback, RunCallback, readable_logs, train_resumable

    nan_guard = NonFiniteLossCallback()
    trainer = build([RunCallback(run.output_dir, run.cfg.train.save_total_limit), nan_guard])
    readable_logs(trainer)
    figures = train_resumable(trainer, run.output_dir, run.resume, nan_guard, run.main, run.data.train_report)
    return trainer, figures


def check_finite(name: str, value: float) -> float:
    import math

    from ..runs import NonFiniteLossError

    if not math.isfinite(value):
        raise NonFiniteLossError(f"{name} is {value}")
    return value


def verifier_accuracy_of(run: StageRun, model, conversations, verifier, what: str | None = None):
    """``finetune.evaluate.verifier_accuracy`` of ``model`` on ``conversations`` with the run's eval settings; with
    ``what`` (e.g. ``"the SFT init"``) the accuracy is also printed, once."""
    from ..evaluate import verifier_accuracy

    cfg = run.cfg
    result = verifier_accuracy(model, run.tokenizer, run.template, conversations, verifier, cfg.eval.max_new_tokens,
                               cfg.eval.batch_size)
    if what and run.main:
        print(f"verifier accuracy of {what}: {result.accuracy:.3f} on {result.num_prompts} eval prompts")
    return result
