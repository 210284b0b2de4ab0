"""The rounds pipeline: Llama 3's post-training loop (or Llama 2's) in one command.

Llama 3 (Grattafiori et al. 2024, https://arxiv.org/abs/2407.21783, section 4.1) post-trains in rounds: a reward
model, rejection sampling from the current model, SFT on the kept samples, DPO on the model's own preference pairs,
and averaging of models from several runs; Llama 2 (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, section
3.2.3) rounds of rejection sampling with PPO on top. One round here (``OUTPUT_DIR/round-N/``):

1. ``reward`` (``reward.enabled``): the reward stage, on its config's pairs plus every earlier round's pairs;
2. ``rejection_sampling``: K samples per prompt from the incumbent, scored by the verifier and/or that reward model;
3. its SFT stage on the kept samples (``rejection_sampling/sft``);
4. ``dpo/seed-S`` (``style: llama3``): DPO on the round's best-against-worst pairs, the reference this round's SFT
   model; or ``ppo/seed-S`` (``style: llama2``): PPO from it; ``average.runs`` runs with seeds ``S``;
5. ``average``: the mean of those runs' merged LoRA deltas as one adapter (:func:`average_adapters`), or with
   ``average.checkpoints: N`` of each run's last N checkpoints (:func:`averaged_directories`);
6. the gate (:func:`gate_decision`): the round's model is promoted only if it beats the incumbent on held-out
   figures (:func:`measure`) by ``gate.margin`` and, with ``gate.max_p_value``, by more than chance on the prompts
   where the two differ (:func:`sign_test_p`); otherwise the incumbent stays and the reason is recorded;
7. the next round starts from the promoted model.

Every stage is its own recipe's code (``finetune.launch.STAGES``), run in this process into its own run directory,
so ``--resume`` skips a finished stage (its ``run.json`` says so), resumes an unfinished one with the stage's own
``--resume``, and starts a missing one. Each round writes ``manifest.json`` (inputs, stage run directories,
figures, seconds, promoted or not and why) after every step; the pipeline ends with ``summary.json``,
``summary.md`` (the figures by round) and ``figures.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from pathlib import Path

from .config import ConfigError, PipelineRunConfig, PipelineStageConfig, parse_args
from .run_dir import CHECKPOINT_COMPLETE, RUN_STATE, RunDir, is_run_directory, write_run_state

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
FIGURES_DIR = "figures"
"""``OUTPUT_DIR/figures/``: each measured model's held-out figures and greedy answers, measured once."""


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: what to do with a stage's directory, the gate


def stage_state(path: str | Path) -> str:
    """``finished`` (``run.json`` says so: skip it), ``unfinished`` (a run directory: resume it with the stage's own
    ``--resume``) or ``absent`` (missing or empty: start it)."""
    path = Path(path)
    if (path / RUN_STATE).is_file() and RunDir.read(path).finished:
        return "finished"
    if is_run_directory(path):
        return "unfinished"
    return "absent"


def gate_decision(candidate: dict, incumbent: dict, metric: str, margin: float,
                  max_p_value: float | None = None) -> tuple[bool, str]:
    """Whether the candidate replaces the incumbent, and why, in one sentence.

    ``accuracy``: candidate accuracy > incumbent accuracy + margin. ``eval_loss``: candidate loss < incumbent loss
    - margin. ``win_rate`` (the candidate's wins against the incumbent, ties counted half, in ``candidate``):
    win rate > 0.5 + margin. A figure that could not be measured is a refusal that says so. With ``max_p_value``,
    an ``accuracy`` or ``win_rate`` gain must also pass the sign test (:func:`sign_test_p`) on the prompts where the
    two models differ (``candidate["prompts_better"]`` and ``["prompts_worse"]``); ``eval_loss`` compares the means.
    """
    promoted, reason = margin_decision(candidate, incumbent, metric, margin)
    if not promoted or max_p_value is None or metric == "eval_loss":
        return promoted, reason
    better, worse = candidate.get("prompts_better"), candidate.get("prompts_worse")
    if better is None or worse is None:
        return False, f"{reason}, but the prompts each model won were not counted, so no sign test; the incumbent stays"
    p = sign_test_p(better, worse)
    test = f"better on {better} prompts and worse on {worse}: one-sided sign test p = {p:.2g}"
    if p > max_p_value:
        return False, f"{reason}, but {test} > gate.max_p_value {max_p_value:g}"
    return True, f"{reason}; {test} <= {max_p_value:g}"


def margin_decision(candidate: dict, incumbent: dict, metric: str, margin: float) -> tuple[bool, str]:
    """:func:`gate_decision` on the figures and the margin alone."""
    value = candidate.get(metric)
    if value is None:
        return False, f"{metric} of the candidate was not measured; the incumbent stays"
    if metric == "win_rate":
        bar, better = 0.5 + margin, value > 0.5 + margin
        compared = f"win rate {value:.3f} against the incumbent"
        return better, f"{compared} {'>' if better else '<='} {bar:.3f} (0.5 + margin {margin:g})"
    base = incumbent.get(metric)
    if base is None:
        return False, f"{metric} of the incumbent was not measured; the incumbent stays"
    if metric == "eval_loss":
        better = value < base - margin
        sign = "<" if better else ">="
        return better, f"eval loss {value:.4f} {sign} incumbent's {base:.4f} - margin {margin:g}"
    better = value > base + margin
    return better, f"{metric} {value:.4f} {'>' if better else '<='} incumbent's {base:.4f} + margin {margin:g}"


def sign_test_p(better: int, worse: int) -> float:
    """One-sided exact sign test: the chance that a candidate no better than the incumbent is better on at least
    ``better`` of the ``better + worse`` prompts where the two differ (each a fair coin). Prompts both answer alike
    say nothing about which is better and are not counted; with none that differ, p is 1."""
    n = better + worse
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n if n else 1.0


def paired_counts(candidate_scores: list[float], incumbent_scores: list[float]) -> tuple[int, int]:
    """``(prompts where the candidate scores above the incumbent, prompts where below)``, one score each a prompt."""
    if len(candidate_scores) != len(incumbent_scores):
        raise ValueError("paired_counts needs one score of each model per prompt")
    pairs = list(zip(candidate_scores, incumbent_scores))
    return sum(c > i for c, i in pairs), sum(c < i for c, i in pairs)


def win_rate(candidate_scores: list[float], incumbent_scores: list[float]) -> float:
    """The fraction of prompts on which the candidate's answer scores above the incumbent's, ties counted half."""
    if len(candidate_scores) != len(incumbent_scores) or not candidate_scores:
        raise ValueError("win_rate needs one score of each model per prompt")
    wins = sum(1.0 if c > i else 0.5 if c == i else 0.0 for c, i in zip(candidate_scores, incumbent_scores))
    return wins / len(candidate_scores)


def stage_seed(seed: int, round_index: int, run: int = 0) -> int:
    """The seed of a stage's run: ``1000 * seed + 10 * round + run`` (each round samples anew; runs differ)."""
    return 1000 * seed + 10 * round_index + run


def summary_rows(rounds: list[dict]) -> list[dict]:
    """One row per round of the manifests: the figures of each model the round made, and the decision."""
    rows = []
    for manifest in rounds:
        models = manifest.get("figures", {})
        row = {"round": manifest["round"], "promoted": manifest.get("promoted"), "reason": manifest.get("reason")}
        for name, figures in models.items():
            for key in ("accuracy", "eval_loss", "win_rate"):
                if figures.get(key) is not None:
                    row[f"{name}/{key}"] = figures[key]
        rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> str:
    """The figures by round as markdown: one column per model, accuracy (or eval loss where there is none)."""
    names = list(dict.fromkeys(key.split("/")[0] for row in rows for key in row if "/" in key))
    lines = ["| round | " + " | ".join(names) + " | promoted | why |", "|---|" + "---:|" * len(names) + "---|---|"]
    for row in rows:
        cells = []
        for name in names:
            acc, loss = row.get(f"{name}/accuracy"), row.get(f"{name}/eval_loss")
            cells.append(f"{100 * acc:.1f}%" if acc is not None else f"loss {loss:.3f}" if loss is not None else "-")
        promoted = "-" if row["promoted"] is None else "yes" if row["promoted"] else "no"
        lines.append(f"| {row['round']} | " + " | ".join(cells) + f" | {promoted} | {row['reason'] or ''} |")
    return "\n".join(lines)


def final_model_lines(summary: dict) -> str:
    """Where the pipeline ended (the model the last promotion left, or the start) and the next commands for it."""
    promoted = [row["round"] for row in summary["rounds"] if row["promoted"]]
    source = f"promoted in round {promoted[-1]}" if promoted else "the starting model: no round was promoted"
    model = summary["model"]
    return "\n".join([f"final model: {model} ({source})", f"  chat:   finetune chat {model}",
                      f"  export: finetune export {model} --to gguf"])


# ---------------------------------------------------------------------------------------------------------------
# Stage configs and runs


def config_path(spec: PipelineStageConfig, name: str) -> Path:
    """A stage's config file: relative to the current directory, else to the checkout (``recipes/configs/...``)."""
    path = Path(spec.config)
    for candidate in (path, ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}.config: no such file {spec.config}")


def stage_config(name: str, spec: PipelineStageConfig, output_dir: Path, resume: bool, **settings):
    """The stage's config, as its recipe would parse ``--config FILE OVERRIDES --output_dir ... --key=value``:
    the pipeline's settings (``init``, data, seeds) come last and win."""
    from .config import STAGE_CONFIGS

    argv = ["--config", str(config_path(spec, name)), *spec.overrides, "--output_dir", str(output_dir)]
    argv += [f"--{key}={value}" for key, value in settings.items() if value is not None]
    if resume:
        argv.append("--resume")
    try:
        return parse_args(STAGE_CONFIGS[name], argv)
    except ConfigError as e:
        raise ConfigError(f"{name} (from {spec.config}): {e}") from None


def check_stage_configs(cfg: PipelineRunConfig, output_dir: Path) -> None:
    """Every stage config the pipeline will use parses with its overrides: a typo fails before anything is written;
    and the DPO stage keeps the checkpoints ``average.checkpoints`` averages (:func:`check_checkpoints_kept`)."""
    placeholder = str(output_dir / "round-0" / "sft")
    names = ["rejection_sampling", "dpo" if cfg.style == "llama3" else "ppo"]
    if cfg.reward.enabled:
        names.append("reward")
    if not cfg.init:
        names.append("sft")
    for name in names:
        parsed = stage_config(name, getattr(cfg, name), output_dir / "check", False,
                              init=None if name == "sft" else placeholder)
        if name == "dpo":
            check_checkpoints_kept(cfg.average.checkpoints, parsed.train, parsed.trainer, cfg.dpo.config)


def check_init(cfg: PipelineRunConfig, output_dir: Path) -> None:
    """``init``, if given, is a finished run whose model can be found and that the first stage's config agrees
    with (base model, template): that stage's checks (:func:`finetune.launch.check_before_run`,
    :func:`finetune.run_dir.resolve_init`) on the real start, made before ``output_dir`` is touched, since the base is
    measured before any stage runs (a missing run would fail there as a hub lookup of its path)."""
    from .launch import check_before_run
    from .run_dir import open_run, resolve_init

    if not cfg.init:
        return
    open_run(cfg.init, "init")
    try:
        first = stage_config("rejection_sampling", cfg.rejection_sampling, output_dir / "check", False, init=cfg.init)
        check_before_run(first)
        resolve_init(first)
    except ConfigError as e:
        raise ConfigError(f"init {cfg.init}: {e}") from None


def check_checkpoints_kept(count: int, train, trainer: dict, config: str) -> None:
    """With ``average.checkpoints: count``, the DPO stage's ``train`` settings keep (``save_total_limit``) and, for a
    run of ``max_steps``, write (``max_steps / save_steps``) at least ``count`` checkpoints; a one-line
    ``ConfigError`` naming the fields otherwise. A run of ``num_epochs`` is checked when it has finished."""
    if not count:
        return
    where = f"average.checkpoints={count} averages each DPO run's last {count} checkpoints, but dpo (from {config})"
    if train.save_total_limit is not None and train.save_total_limit < count:
        raise ConfigError(f"{where} keeps train.save_total_limit={train.save_total_limit}; add "
                          f"--train.save_total_limit={count} to dpo.overrides, or lower average.checkpoints")
    if trainer.get("save_strategy", "steps") != "steps":
        return
    if train.max_steps > 0 and train.max_steps // train.save_steps < count:
        raise ConfigError(f"{where} writes {train.max_steps // train.save_steps} (train.max_steps={train.max_steps}, "
                          f"train.save_steps={train.save_steps}); lower train.save_steps in dpo.overrides, or lower "
                          "average.checkpoints")


def run_stage_step(name: str, spec: PipelineStageConfig, output_dir: Path, **settings) -> dict:
    """Run one stage into ``output_dir`` unless it finished there: its summary. An unfinished run there is resumed
    with the stage's own ``--resume``; a missing one started."""
    from .launch import STAGES, check_before_run
    from .runs import process_state

    state = stage_state(output_dir)
    process_state().wait_for_everyone()  # every process has read the state before any process writes
    if state == "finished":
        print(f"pipeline: {output_dir} finished; skipped", flush=True)
        return json.loads((output_dir / "summary.json").read_text())
    if state == "unfinished":
        print(f"pipeline: resuming {output_dir}", flush=True)
    cfg = stage_config(name, spec, output_dir, state == "unfinished", **settings)
    check_before_run(cfg)
    summary = STAGES[name.replace("_", "-")][1](cfg)
    gc.collect()
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Averaging


def last_checkpoints(run_dir: Path, count: int) -> list[Path]:
    """A run's last ``count`` complete checkpoints, oldest first (``finetune.runs.complete_checkpoints``: ordered
    by step, so ``checkpoint-10`` comes after ``checkpoint-9``; a half-written one or a staging directory is not
    counted); fewer when the run kept fewer."""
    from .runs import complete_checkpoints

    return complete_checkpoints(run_dir)[-count:] if count > 0 else []


def averaged_directories(run_dirs: list[Path], checkpoints: int) -> list[Path]:
    """What the average step averages: the runs themselves (``checkpoints`` 0), or each run's last ``checkpoints``
    complete checkpoints, run by run (:func:`last_checkpoints`). A run that kept fewer is a one-line ``ConfigError``
    naming its save settings."""
    if not checkpoints:
        return list(run_dirs)
    chosen = []
    for run in run_dirs:
        kept = last_checkpoints(run, checkpoints)
        if len(kept) < checkpoints:
            train = RunDir.read(run).config.get("train") or {}
            raise ConfigError(f"average.checkpoints={checkpoints}: {run} kept {len(kept)} complete checkpoint(s) "
                              f"({', '.join(path.name for path in kept) or 'none'}; train.save_steps={train.get('save_steps')}, "
                              f"train.save_total_limit={train.get('save_total_limit')}); lower average.checkpoints, or "
                              "save more often in dpo.overrides and run the round's DPO again")
        chosen += kept
    return chosen


def average_adapters(run_dirs: list[Path], output_dir: Path, combination: str = "svd", rank: int | None = None) -> dict:
    """The mean of the runs' merged LoRA deltas, ``mean_i(B_i A_i alpha_i / r_i)``, as one adapter run in
    ``output_dir`` (PEFT's ``add_weighted_adapter``, weights ``1/n``). A directory may be a run's
    ``checkpoint-STEP/`` (``average.checkpoints``): its adapter is the checkpoint's, its base, template and
    tokenizer the run's (:meth:`RunDir.read_checkpoint`).

    ``cat`` stacks the factors (``A = [w A_1 s_1; ...]``, ``B = [B_1, ...]``): exactly the mean delta, rank
    ``sum r_i``. ``svd`` takes the mean delta and keeps its top ``rank`` singular directions (default: the runs'
    rank); the relative Frobenius error of that truncation is returned (``relative_error``, over all modules).
    Averaging A and B separately (PEFT's ``linear``) would give ``mean(B) mean(A)``, not the mean of the models.

    The directory is written as a finished run (the first run's ``config.yaml``, tokenizer and generation config,
    ``average.json``, ``run.json``), staged and renamed into place, so ``--init`` and the next round read it.
    ``average.json`` (returned) names the averaged ``directories`` and the ``runs`` they are of.
    """
    import shutil

    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from .config import ModelConfig, from_dict
    from .model_card import write_model_card
    from .models import load_base_model, save_adapter

    runs = [RunDir.read_any(path) for path in run_dirs]
    for run in runs:
        if run.kind != "adapter":
            raise ConfigError(f"average: {run.path} holds no adapter; only LoRA runs are averaged")
        if run.run_path is not None and not run.finished:
            raise ConfigError(f"average: {run.path} is not a complete checkpoint (no {CHECKPOINT_COMPLETE})")
        if run.base_model != runs[0].base_model:
            raise ConfigError(f"average: {run.path} trained on {run.base_model}, {runs[0].path} on {runs[0].base_model}")
    model_cfg = dataclasses.replace(from_dict(ModelConfig, runs[0].config.get("model") or {}, "model"),
                                    name=runs[0].base_model)
    base = load_base_model(model_cfg, "lora", for_training=False)  # deltas only: the base is never quantised here
    names = [f"run{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(runs[0].path), adapter_name=names[0])
    for name, run in zip(names[1:], runs[1:]):
        model.load_adapter(str(run.path), adapter_name=name)
    weights = [1.0 / len(runs)] * len(runs)
    model.add_weighted_adapter(names, weights, "averaged", combination_type=combination, svd_rank=rank)
    error_sq, norm_sq = 0.0, 0.0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and "averaged" in module.lora_A:
                mean = sum(w * module.get_delta_weight(name) for w, name in zip(weights, names))
                error_sq += float((module.get_delta_weight("averaged") - mean).pow(2).sum())
                norm_sq += float(mean.pow(2).sum())
    staging = output_dir.parent / f".{output_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(model, "averaged", staging)
    for item in runs[0].files_path.iterdir():  # tokenizer, template, generation config: the runs share them
        if item.is_file() and item.name not in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl",
                                                 "summary.json", "loss.png", RUN_STATE, "rejects.jsonl",
                                                 "training_args.bin", "README.md"):
            shutil.copy2(item, staging / item.name)
    figures = {"runs": list(dict.fromkeys(str(run.files_path) for run in runs)),
               "directories": [str(run.path) for run in runs], "combination": combination,
               "rank": model.peft_config["averaged"].r, "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0}
    atomic_write_text(staging / "average.json", json.dumps(figures, indent=2) + "\n")
    atomic_write_text(staging / "summary.json", json.dumps(figures, indent=2) + "\n")
    write_run_state(staging, "average", "running")
    write_run_state(staging, "average", "finished", "adapter")
    write_model_card(staging, final_path=output_dir)  # what `finetune push` uploads: which runs, how averaged
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    del model, base
    gc.collect()
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Held-out figures


def load_for_eval(source: str | Path):
    """``(model, tokenizer, template name, max_length)`` of a run directory (adapter or full weights) or a bare
    model name (the base), for measuring."""
    from .config import ModelConfig, from_dict
    from .models import load_adapter, load_base_model, load_tokenizer

    # A local model directory (downloaded weights, no config.yaml or run.json) is a base like a hub id, not a run.
    path = Path(source)
    run = RunDir.read(path) if is_run_directory(path) else None
    if run is None or run.kind is None:
        return load_base_model(ModelConfig(name=str(source)), "lora", for_training=False), None, None
    model_cfg = from_dict(ModelConfig, run.config.get("model") or {}, "model") if run.config else ModelConfig(str(path))
    if run.kind == "adapter":
        model = load_adapter(load_base_model(dataclasses.replace(model_cfg, name=run.base_model), run.method or "lora",
                                             for_training=False), path)
    else:
        model = load_base_model(dataclasses.replace(model_cfg, name=str(path)), "lora", for_training=False)
    return model, load_tokenizer(str(path)), run


def measure(source: str | Path, gate, template_from: str | Path | None = None) -> dict:
    """Held-out figures of a model: ``accuracy`` (verifier accuracy of greedy answers, if there is a verifier),
    ``eval_loss`` (mean NLL per reply token of the reference replies) and the greedy ``answers`` (for win rates),
    on ``gate.data``. A bare model name takes its tokenizer and template from the run ``template_from``."""
    from .data import load_conversations, prompt_and_reference, tokenize_conversations
    from .evaluate import eval_loss, load_callable, verifier_accuracy
    from .models import load_tokenizer
    from .templates import get_template

    model, tokenizer, run = load_for_eval(source)
    if run is None:
        run = RunDir.read(template_from)
        tokenizer = load_tokenizer(str(template_from))
    template = get_template(run.template, tokenizer)
    conversations = load_conversations(gate.data, split=gate.split, limit=gate.max_samples, name="gate data")
    verifier = load_callable(gate.verifier) if gate.verifier else (lambda prompt, response: False)
    result = verifier_accuracy(model, tokenizer, template, conversations, verifier, gate.max_new_tokens,
                               gate.batch_size, num_shown=len(conversations))
    max_length = (run.config.get("data") or {}).get("max_length", 256)
    rows, _ = tokenize_conversations(conversations, template, tokenizer, max_length)
    figures = {"model": str(source), "eval_loss": eval_loss(model, rows, tokenizer.pad_token_id, gate.batch_size),
               "accuracy": result.accuracy if gate.verifier else None, "num_prompts": result.num_prompts,
               "answers": [[*prompt_and_reference(c)[0], {"role": "assistant", "content": s["response"]}]
                           for c, s in zip(conversations, result.samples)]}
    del model
    gc.collect()
    return figures


def cached_measure(output_dir: Path, source: str | Path, gate, template_from=None) -> dict:
    """:func:`measure`, written to ``OUTPUT_DIR/figures/`` once and read back after (greedy answers repeat)."""
    from .runs import process_state

    key = str(Path(source).resolve().relative_to(output_dir.resolve())) if Path(source).is_dir() and \
        Path(source).resolve().is_relative_to(output_dir.resolve()) else str(source)
    path = output_dir / FIGURES_DIR / (key.replace("/", "__").strip("_") + ".json")
    if path.is_file():
        return json.loads(path.read_text())
    figures = measure(source, gate, template_from)
    state = process_state()
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(figures) + "\n")
    state.wait_for_everyone()
    return figures


def reward_scores(reward_dir: Path, candidate: dict, incumbent: dict) -> tuple[list[float], list[float]]:
    """The reward model's score of each greedy answer of the candidate and of the incumbent, prompt by prompt."""
    from .reward_model import load_reward_model

    reward = load_reward_model(reward_dir)
    scores = reward.score(candidate["answers"]), reward.score(incumbent["answers"])
    del reward
    gc.collect()
    return scores


def verifier_scores(figures: dict, verifier) -> list[float]:
    """1 for each greedy answer of ``figures`` the verifier passes, else 0, prompt by prompt (as :func:`measure`
    scored them: the last user turn and the answer)."""
    return [float(bool(verifier(answer[-2]["content"], answer[-1]["content"]))) for answer in figures["answers"]]


def atomic_write_text(path: Path, text: str) -> None:
    from .runs import atomic_write_text as write  # finetune.runs imports transformers: not for the pure parts

    write(path, text)


def public(figures: dict) -> dict:
    """The figures without the answers (what a manifest records)."""
    return {key: value for key, value in figures.items() if key != "answers"}


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


ROUND_PAIRS_DATA = {"data.format": "preference", "data.split": "null"}
"""The data settings beside a ``data.train`` the pipeline writes (a preference JSONL file): the stage config's own
``format`` and ``split`` describe its own data (``split: train_prefs`` of a hub set), and would misread that file
or refuse it (a file has no other split than ``train``)."""
GATHERED_PAIRS_DATA = {**ROUND_PAIRS_DATA, "data.max_train_samples": "null", "data.skip_invalid": "false"}
"""The reward stage's, for ``round-N/reward_pairs.jsonl``: the config's ``max_train_samples`` and ``skip_invalid``
already chose its own pairs in :func:`gathered_pairs`; applied again they would cut the earlier rounds' pairs off
the gathered file's end."""


def gathered_pairs(output_dir: Path, round_index: int, data) -> Path:
    """``round-N/reward_pairs.jsonl``: the reward config's pairs (``data``: its ``data`` section) plus every earlier
    round's pairs."""
    from data_formats import write

    from .data import load_preferences

    pairs = list(load_preferences(data.train, data.format, data.split, data.max_train_samples,
                                  skip_invalid=data.skip_invalid, name="reward pairs"))
    for earlier in range(1, round_index):
        path = output_dir / f"round-{earlier}" / "rejection_sampling" / "pairs.jsonl"
        if path.is_file():
            pairs += list(load_preferences(str(path), name=f"round {earlier} pairs"))
    target = output_dir / f"round-{round_index}" / "reward_pairs.jsonl"
    write(pairs, target, to="preference")
    return target


class Pipeline:
    """One pipeline run: the rounds over ``cfg`` (see the module docstring)."""

    def __init__(self, cfg: PipelineRunConfig, output_dir: Path):
        from .runs import process_state

        self.cfg, self.out, self.state = cfg, output_dir, process_state()
        self.recorded: dict[int, dict] = {}

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    def write_manifest(self, manifest: dict) -> None:
        if self.main:
            path = self.out / f"round-{manifest['round']}" / MANIFEST
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
        self.state.wait_for_everyone()

    def recorded_seconds(self, round_index: int) -> dict:
        """The seconds the round's manifest held when this process first looked (before it rewrote it)."""
        if round_index not in self.recorded:
            path = self.out / f"round-{round_index}" / MANIFEST
            self.recorded[round_index] = json.loads(path.read_text()).get("seconds", {}) if path.is_file() else {}
        return self.recorded[round_index]

    def timed(self, manifest: dict, step: str, work):
        """``work()``, its wall seconds added to ``manifest["seconds"][step]`` on top of what a run before a resume
        recorded there (a skipped step then keeps its first run's seconds)."""
        before = self.recorded_seconds(manifest["round"]).get(step, 0.0)
        started = time.perf_counter()
        result = work()
        manifest.setdefault("seconds", {})[step] = round(before + time.perf_counter() - started, 2)
        return result

    def round_zero(self) -> dict:
        """The starting model (``init``, or an SFT run of ``sft``), and the base's and its figures."""
        cfg, out = self.cfg, self.out
        manifest = {"round": 0, "stages": {}}
        self.recorded_seconds(0)
        start = Path(cfg.init) if cfg.init else out / "round-0" / "sft"
        if not cfg.init:
            summary = self.timed(manifest, "sft", lambda: run_stage_step("sft", cfg.sft, start))
            manifest["stages"]["sft"] = {"run_dir": str(start), "summary_eval_accuracy": summary.get("eval_accuracy")}
        run = RunDir.read(start)
        base = run.base_model or "tiny"
        manifest["figures"] = {
            "base": public(self.timed(manifest, "measure base", lambda: cached_measure(out, base, cfg.gate, start))),
            "sft": public(self.timed(manifest, "measure sft", lambda: cached_measure(out, start, cfg.gate))),
        }
        manifest.update(model=str(start), promoted=None, reason="the starting model")
        self.write_manifest(manifest)
        return manifest

    def run_round(self, n: int, incumbent: str) -> dict:
        cfg, out = self.cfg, self.out
        rdir = out / f"round-{n}"
        manifest = {"round": n, "style": cfg.style, "incumbent": incumbent, "inputs": {"init": incumbent},
                    "stages": {}, "seconds": {}}
        self.recorded_seconds(n)  # before this run rewrites the manifest
        if self.main:
            rdir.mkdir(parents=True, exist_ok=True)
        self.state.wait_for_everyone()
        reward_dir = None
        if cfg.reward.enabled:
            reward_cfg = stage_config("reward", cfg.reward, rdir / "reward", False, init=incumbent)
            pairs = rdir / "reward_pairs.jsonl"
            if self.main and not pairs.is_file():
                gathered_pairs(out, n, reward_cfg.data)
            self.state.wait_for_everyone()
            reward_dir = rdir / "reward"
            # The gathered file already holds the config's pairs as its data section selects them (format, split,
            # max_train_samples) plus every earlier round's: read it whole, as the preference file it is.
            summary = self.timed(manifest, "reward", lambda: run_stage_step(
                "reward", cfg.reward, reward_dir, init=incumbent, **GATHERED_PAIRS_DATA, **{"data.train": pairs}))
            manifest["inputs"]["reward_pairs"] = str(pairs)
            manifest["stages"]["reward"] = {"run_dir": str(reward_dir), "eval_accuracy": summary.get("eval_accuracy")}
            self.write_manifest(manifest)

        rs_dir = rdir / "rejection_sampling"
        seed = stage_seed(cfg.seed, n)
        summary = self.timed(manifest, "rejection_sampling", lambda: run_stage_step(
            "rejection_sampling", cfg.rejection_sampling, rs_dir, init=incumbent,
            **{"sampling.seed": seed, "train.seed": seed, "score.reward_model": reward_dir}))
        sft_dir = rs_dir / "sft"
        manifest["stages"]["rejection_sampling"] = {
            "run_dir": str(rs_dir), "sft_run_dir": str(sft_dir),
            **{key: summary.get(key) for key in ("kept_samples", "preference_pairs", "mean_score_all",
                                                 "mean_score_kept", "prompts_kept_nothing", "sampling_seconds")}}
        self.write_manifest(manifest)

        last = "dpo" if cfg.style == "llama3" else "ppo"
        run_dirs = []
        runs = cfg.average.runs
        if last == "dpo" and not summary.get("preference_pairs"):
            # Every prompt's samples scored alike: there is nothing to prefer, and the round's model is the SFT one.
            manifest["stages"]["dpo"] = {"skipped": "rejection sampling wrote no preference pairs (every prompt's "
                                                    "samples scored alike)"}
            runs = 0
        for i in range(runs):
            run_seed = stage_seed(cfg.seed, n, i)
            run_dir = rdir / last / f"seed-{run_seed}"
            if last == "dpo":
                settings = {"init": sft_dir, **ROUND_PAIRS_DATA, "data.train": rs_dir / "pairs.jsonl",
                            "train.seed": run_seed}
            else:
                settings = {"init": sft_dir, "ppo.seed": run_seed, "sampling.seed": run_seed,
                            "score.reward_model": reward_dir}
            self.timed(manifest, f"{last} seed {run_seed}",
                       lambda run_dir=run_dir, settings=settings: run_stage_step(last, getattr(cfg, last), run_dir,
                                                                                 **settings))
            run_dirs.append(run_dir)
            manifest["stages"].setdefault(last, []).append({"run_dir": str(run_dir), "seed": run_seed})
            self.write_manifest(manifest)

        candidate = run_dirs[0] if run_dirs else sft_dir
        averaged = len(run_dirs) > 1 or bool(run_dirs and cfg.average.checkpoints)
        if averaged:
            candidate = rdir / "average"

            def average():
                if stage_state(candidate) != "finished":  # written whole or not at all: redo if absent
                    directories = averaged_directories(run_dirs, cfg.average.checkpoints)  # every process: one refusal
                    if self.main:
                        average_adapters(directories, candidate, cfg.average.combination, cfg.average.rank)
                self.state.wait_for_everyone()

            self.timed(manifest, "average", average)
            manifest["stages"]["average"] = json.loads((candidate / "average.json").read_text())
            manifest["stages"]["average"].update(run_dir=str(candidate), checkpoints=cfg.average.checkpoints)
            self.write_manifest(manifest)

        # The gate: every model of the round measured on the same held-out data, the candidate against the incumbent.
        def measure_all():
            models = {"incumbent": incumbent, "rejection_sampling": sft_dir,
                      **{f"{last}_{i + 1}": d for i, d in enumerate(run_dirs)}}
            if averaged:
                models["average"] = candidate
            return {name: cached_measure(out, path, cfg.gate) for name, path in models.items()}

        measured = self.timed(manifest, "gate", measure_all)
        candidate_figures = dict(measured["average" if averaged else f"{last}_1" if run_dirs else
                                          "rejection_sampling"])
        paired = None  # per-prompt scores of the candidate and the incumbent, for the gate's sign test
        if reward_dir is not None:
            scores = reward_scores(reward_dir, candidate_figures, measured["incumbent"])
            candidate_figures["win_rate"] = win_rate(*scores)
            paired = scores if cfg.gate.metric == "win_rate" else None
        if cfg.gate.metric == "accuracy" and cfg.gate.verifier:
            from .evaluate import load_callable

            verifier = load_callable(cfg.gate.verifier)
            paired = verifier_scores(candidate_figures, verifier), verifier_scores(measured["incumbent"], verifier)
        if paired is not None:
            candidate_figures["prompts_better"], candidate_figures["prompts_worse"] = paired_counts(*paired)
        promoted, reason = gate_decision(candidate_figures, measured["incumbent"], cfg.gate.metric, cfg.gate.margin,
                                         cfg.gate.max_p_value)
        figures = {name: public(f) for name, f in measured.items()}
        if averaged:
            accuracies = [measured[f"{last}_{i + 1}"]["accuracy"] for i in range(len(run_dirs))]
            if None not in accuracies:
                manifest["stages"]["average"]["mean_run_accuracy"] = sum(accuracies) / len(accuracies)
        figures["candidate"] = public(candidate_figures)
        manifest.update(figures=figures, candidate=str(candidate), promoted=promoted, reason=reason,
                        model=str(candidate) if promoted else incumbent,
                        gate={"metric": cfg.gate.metric, "margin": cfg.gate.margin,
                              "max_p_value": cfg.gate.max_p_value})
        self.write_manifest(manifest)
        if self.main:
            print(f"pipeline round {n}: {'promoted' if promoted else 'not promoted'} {candidate}: {reason}", flush=True)
        return manifest

    def run(self) -> dict:
        manifests = [self.round_zero()]
        incumbent = manifests[0]["model"]
        for n in range(1, self.cfg.rounds + 1):
            manifests.append(self.run_round(n, incumbent))
            incumbent = manifests[-1]["model"]
        rows = summary_rows(manifests)
        summary = {"style": self.cfg.style, "seed": self.cfg.seed, "rounds": rows, "model": incumbent,
                   "round_seconds": [sum(m.get("seconds", {}).values()) for m in manifests]}
        if self.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            atomic_write_text(self.out / "summary.md", summary_table(rows) + "\n")
            plot_rounds(self.out, rows)
        return summary


def plot_rounds(output_dir: Path, rows: list[dict]) -> Path | None:
    """``figures.png``: verifier accuracy (or eval loss) of each model by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "accuracy" if any(k.endswith("/accuracy") for row in rows for k in row) else "eval_loss"
    names = list(dict.fromkeys(k.split("/")[0] for row in rows for k in row if k.endswith(f"/{key}")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(row["round"], row[f"{name}/{key}"]) for row in rows if f"{name}/{key}" in row]
        if name != "incumbent":
            ax.plot(*zip(*points), "o-", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(key.replace("_", " "))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = output_dir / "figures.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg: PipelineRunConfig) -> dict:
    """Check every stage config, prepare ``output_dir`` (``--resume`` continues, ``--overwrite`` replaces a previous
    pipeline), run the rounds; returns the summary also written to ``summary.json``."""
    from .runs import apply_output_dir, plan_output_dir, process_state, write_config

    state = process_state()
    out = Path(cfg.output_dir)
    check_stage_configs(cfg, out)
    check_init(cfg, out)
    inputs = {"init": cfg.init} if cfg.init else {}
    # A pipeline that stopped before its first stage wrote anything has nothing to resume: a plain rerun restarts it.
    action = plan_output_dir(out, cfg.resume, cfg.overwrite, inputs,
                             has_progress=lambda path: (path / "round-0").exists())
    state.wait_for_everyone()
    output = apply_output_dir(out, action, state.is_main_process, report_checkpoint=False)
    state.wait_for_everyone()
    try:
        if state.is_main_process:
            write_config(out, cfg)
            write_run_state(out, "pipeline", "running")
        state.wait_for_everyone()
        summary = Pipeline(cfg, out).run()
        if state.is_main_process:
            write_run_state(out, "pipeline", "finished")
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            output.abandon()
        raise
    if state.is_main_process:
        output.commit()
    return summary
