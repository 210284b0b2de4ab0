"""Rejection sampling from an SFT run: K samples per prompt, scored, the best kept and trained on with the SFT stage.

Llama 2 (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, section 3.2.3) samples K answers per prompt from
the current policy, keeps the one the reward model scores highest and fine-tunes on those; Llama 3 (Grattafiori et
al. 2024, https://arxiv.org/abs/2407.21783, section 4.2) also turns the best and worst answers into preference pairs
for DPO. Here:

1. The SFT run (``init``) is loaded once; under several processes each takes its share of the prompts
   (``split_between_processes``) and the scored samples are gathered, so every prompt is sampled exactly once.
2. Each prompt gets ``sampling.num_samples`` samples (``finetune.generation``), scored by ``finetune.scorers``.
3. :func:`select` keeps each prompt's best sample (optionally only above ``min_score``) or every sample above a
   threshold, and pairs each prompt's best with its worst.
4. ``OUTPUT_DIR`` gets ``samples.jsonl`` (every sample with its scores), ``kept.jsonl`` (the kept samples as a chat
   ``messages`` dataset with their scores) and ``pairs.jsonl`` (a ``prompt``/``chosen``/``rejected`` preference
   dataset that ``recipes/dpo.py`` reads).
5. Unless ``generate_only``, the SFT stage itself (``finetune.stages.sft.run``) continues the SFT adapter on
   ``kept.jsonl`` into ``OUTPUT_DIR/sft``, measuring verifier accuracy before (the SFT model) and after.

``--resume`` continues a killed run. The three files are each written whole (temporary file renamed into place) and
``generation_complete.json`` is written after them, with the sampling figures and the settings that decided the
samples: with that marker present the samples are reused, never drawn again; without it sampling starts over (a
run killed while sampling left nothing reusable). The fine-tune then resumes from the newest complete checkpoint of
``OUTPUT_DIR/sft``, as ``recipes/sft.py --resume`` does, or starts afresh if it had saved none. Sampling itself
does not resume mid-way: each process draws its samples from one seeded random stream, so continuing a partial set
into the same samples would need that stream's state saved with every batch, which is not done.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import yaml

from data_formats import same_reply

from ..config import ConfigError, RejectionParams, RejectionSamplingRunConfig, SFTRunConfig, to_dict
from ..data import load_conversations
from ..generation import Decoding
from ..models import load_adapter, load_base_model
from ..prompts import Prompt, load_prompts
from ..rollout import sample_groups
from ..run_dir import resolve_init
from ..runs import (
    atomic_write_text,
    latest_complete_checkpoint,
    process_state,
    two_column_table,
)
from ..scorers import build_scorer
from ..templates import stop_token_ids
from .scaffold import Stage, StageData, StageRun, Trained, run_stage

GENERATION_FILES = ("samples.jsonl", "kept.jsonl", "pairs.jsonl")
GENERATION_MARKER = "generation_complete.json"
"""Written after the files of ``GENERATION_FILES``: they are complete, and reusable by ``--resume``, only with it."""
GENERATION_SECTIONS = ("init", "model", "data", "sampling", "score", "rejection")
"""The config sections that decide the samples, the kept samples and the pairs."""


def sample_and_score(model, tokenizer, prompts: list[Prompt], stop_ids, sampling, scorer) -> list[dict]:
    """``sampling.num_samples`` scored samples per prompt (``finetune.rollout.sample_groups``), as rows ordered by
    (prompt, sample), the same on every process: each process samples its share of the prompts and the rows are
    gathered."""
    from accelerate.utils import gather_object

    state = process_state()
    with state.split_between_processes(prompts) as share:
        config = Decoding(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                                seed=sampling.seed + state.process_index)
        samples = sample_groups(model, tokenizer, share, sampling.num_samples, stop_ids, config, sampling.batch_size,
                                scorer, progress="rejection sampling")
        local = [
            {
                "prompt_index": s.prompt.index,
                "sample": s.sample,
                "prompt": s.prompt.messages,
                "response": s.completion.text,
                "score": s.score,
                "scores": s.scores,
                "stopped": s.completion.stopped,
                "response_tokens": len(s.completion.token_ids),
            }
            for s in samples
        ]
    rows = gather_object(local) if state.num_processes > 1 else local
    return sorted(rows, key=lambda r: (r["prompt_index"], r["sample"]))


def select(rows: list[dict], params: RejectionParams, verifier: str | None = None
           ) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """Which samples to keep, and the (best, worst) pairs, from scored rows of one or more prompts.

    ``best``: per prompt the highest score (the first sample on ties), kept if it is at least ``min_score`` (when
    set); ``threshold``: every sample scoring at least ``threshold``. With a ``verifier`` (the name of its part in
    each row's ``scores``), a sample it failed (scored 0 or less) is never kept unless ``keep_unverified``. A pair is
    a prompt's best sample and the worst of those whose text differs from it (surrounding whitespace aside), when
    best - worst > ``min_margin``. Empty responses are never kept or paired.
    """
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    kept, pairs = [], []
    for index in sorted(by_prompt):
        candidates = [r for r in by_prompt[index] if r["response"].strip()]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["score"])  # max keeps the first of equal scores
        # A rejected reply that is the chosen one with other surrounding whitespace is no preference, and the
        # preference reader refuses such a pair: DPO would stop on this stage's own pairs.jsonl.
        rivals = [r for r in candidates if not same_reply(r["response"], best["response"])]
        if params.selection == "best":
            chosen = [best] if params.min_score is None or best["score"] >= params.min_score else []
        else:
            chosen = [r for r in candidates if r["score"] >= params.threshold]
        if verifier and not params.keep_unverified:
            chosen = [r for r in chosen if r["scores"][verifier] > 0]
        kept.extend(chosen)
        worst = min(rivals, key=lambda r: r["score"]) if rivals else None
        if worst is not None and best["score"] - worst["score"] > params.min_margin:
            pairs.append((best, worst))
    return kept, pairs


def write_outputs(output_dir: Path, rows: list[dict], kept: list[dict], pairs: list[tuple[dict, dict]] | None) -> None:
    """``samples.jsonl``, ``kept.jsonl`` (chat messages + score) and, unless ``pairs`` is ``None``, ``pairs.jsonl``
    (prompt/chosen/rejected)."""
    from data_formats import Conversation, PreferencePair, write

    kept_ids = {(r["prompt_index"], r["sample"]) for r in kept}
    atomic_write_text(
        output_dir / "samples.jsonl",
        "".join(json.dumps({**row, "kept": (row["prompt_index"], row["sample"]) in kept_ids}) + "\n" for row in rows),
    )
    write(  # data_formats.write also writes a temporary file and renames it
        [
            Conversation(
                [*r["prompt"], {"role": "assistant", "content": r["response"]}],
                origin=f"samples.jsonl prompt {r['prompt_index']} sample {r['sample']}",
                meta={"score": r["score"], "prompt_index": r["prompt_index"], "sample": r["sample"]},
            )
            for r in kept
        ],
        output_dir / "kept.jsonl",
        to="messages",
    )
    if pairs is None:
        return
    write(
        [
            PreferencePair(
                best["prompt"],
                [{"role": "assistant", "content": best["response"]}],
                [{"role": "assistant", "content": worst["response"]}],
                origin=f"samples.jsonl prompt {best['prompt_index']}",
                meta={"chosen_score": best["score"], "rejected_score": worst["score"],
                      "prompt_index": best["prompt_index"]},
            )
            for best, worst in pairs
        ],
        output_dir / "pairs.jsonl",
        to="preference",
    )


def sample_figures(rows: list[dict], kept: list[dict], pairs: list, num_prompts: int) -> dict:
    """What the sampling step reports: mean score of all and of the kept samples, prompts that kept nothing."""
    kept_prompts = {r["prompt_index"] for r in kept}
    figures = {
        "num_prompts": num_prompts,
        "num_samples": len(rows),
        "mean_score_all": sum(r["score"] for r in rows) / max(len(rows), 1),
        "mean_score_kept": sum(r["score"] for r in kept) / len(kept) if kept else None,
        "kept_samples": len(kept),
        "prompts_kept_nothing": num_prompts - len(kept_prompts),
        "preference_pairs": len(pairs),
        "stopped_fraction": sum(r["stopped"] for r in rows) / max(len(rows), 1),
        "mean_response_tokens": sum(r["response_tokens"] for r in rows) / max(len(rows), 1),
    }
    for name in rows[0]["scores"] if rows else ():
        figures[f"mean_score_all/{name}"] = sum(r["scores"][name] for r in rows) / len(rows)
    return figures


def generation_settings(cfg: RejectionSamplingRunConfig) -> dict[str, object]:
    """``GENERATION_SECTIONS`` of ``cfg`` as flat ``section.key`` -> value, JSON round-tripped so they compare equal
    to what a marker file holds."""
    tree = {name: value for name, value in to_dict(cfg).items() if name in GENERATION_SECTIONS}
    flat: dict[str, object] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(tree, "")
    return json.loads(json.dumps(flat))


def write_generation_marker(output_dir: Path, cfg: RejectionSamplingRunConfig, summary: dict) -> None:
    """Mark the generation outputs complete, with the sampling figures a resumed run reports again."""
    marker = {"settings": generation_settings(cfg), "summary": summary}
    atomic_write_text(output_dir / GENERATION_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")


def completed_generation(output_dir: Path, cfg: RejectionSamplingRunConfig) -> dict | None:
    """The sampling figures of a complete generation in ``output_dir`` (``None`` if there is none). Samples drawn with
    other settings are refused rather than silently trained on."""
    path = output_dir / GENERATION_MARKER
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    now, before = generation_settings(cfg), saved["settings"]
    changed = sorted(key for key in now.keys() | before.keys() if now.get(key) != before.get(key))
    if changed:
        raise ConfigError(
            f"--resume: the samples in {output_dir} were drawn with other settings ({', '.join(changed)}); "
            "resume with the same settings, or pass --overwrite to sample again"
        )
    return saved["summary"]


def resumable_output_dir(cfg: RejectionSamplingRunConfig) -> Path:
    """``output_dir`` for ``--resume``: it must hold a rejection-sampling run (its ``config.yaml``)."""
    if cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    path = Path(cfg.output_dir)
    config = path / "config.yaml"
    if not config.is_file() or "sampling" not in (yaml.safe_load(config.read_text()) or {}):
        raise ConfigError(f"--resume: {path} holds no rejection-sampling run to resume (no config.yaml of one)")
    return path


def sft_config(cfg: RejectionSamplingRunConfig, output_dir: Path, resume: bool = False) -> SFTRunConfig:
    """The SFT stage's config for the fine-tune: continue the ``init`` adapter on ``kept.jsonl``. Without ``resume``
    a leftover ``OUTPUT_DIR/sft`` (a fine-tune killed before its first checkpoint) is replaced."""
    data = dataclasses.replace(cfg.data, train=str(output_dir / "kept.jsonl"), format="messages", split=None,
                               max_train_samples=None)
    return SFTRunConfig(output_dir=str(output_dir / "sft"), init=cfg.init, model=cfg.model, adapter=cfg.adapter,
                     data=data, train=cfg.train, eval=cfg.eval, trainer=cfg.trainer, resume=resume,
                     overwrite=not resume)


def load_sft_model(cfg: RejectionSamplingRunConfig, init_kind: str):
    """The SFT model to sample: the base with the SFT adapter, or a full-weights SFT run itself (``model.name`` once
    resolved; the fine-tune then puts a new ``adapter`` on it, as the SFT stage does from full weights)."""
    base = load_base_model(cfg.model, cfg.adapter.method, for_training=False)
    return base if init_kind == "full" else load_adapter(base, cfg.init)


def resolve(cfg: RejectionSamplingRunConfig):
    """The ``--init`` resolution (the fine-tune continues the SFT adapter, so it keeps its shape); ``--resume`` needs
    a rejection-sampling run in ``output_dir``."""
    cfg, init, changed = resolve_init(cfg)
    if cfg.resume:
        resumable_output_dir(cfg)
    return cfg, init, changed


def load_data(cfg: RejectionSamplingRunConfig, tokenizer, template) -> StageData:
    """The scorer (a bad verifier or reward run fails here) and the prompts: ``(prompts, skipped, scorer)``."""
    scorer = build_scorer(cfg.score)
    loads: list = []  # what each load skipped, for OUTPUT_DIR/rejects.jsonl
    conversations = load_conversations(cfg.data.train, cfg.data.format, cfg.data.split, cfg.data.max_train_samples,
                                       skip_invalid=cfg.data.skip_invalid, reports=loads, name="train data")
    prompts, skipped = load_prompts(conversations, template, tokenizer, cfg.data.max_length)
    if not prompts:
        raise ConfigError(f"no prompt of {cfg.data.train} fits data.max_length={cfg.data.max_length}")
    report = [f"prompts: {len(prompts)} from {cfg.data.train}, {len(skipped)} skipped (longer than data.max_length)"]
    return StageData((prompts, skipped, scorer), report, loads)


def has_progress(output_dir: Path) -> bool:
    """Complete samples, or a fine-tune checkpoint, are worth resuming."""
    return (output_dir / GENERATION_MARKER).is_file() or latest_complete_checkpoint(output_dir / "sft") is not None


def train(run: StageRun) -> Trained:
    """Sample, score, select, write; then fine-tune with the SFT stage unless ``generate_only``."""
    from ..stages import sft

    cfg, state, main, output_dir, tokenizer, template = run.cfg, run.state, run.main, run.output_dir, run.tokenizer, run.template
    prompts, skipped, scorer = run.data
    init_kind = run.init.kind
    reused = completed_generation(output_dir, cfg) if cfg.resume else None
    state.wait_for_everyone()  # every process has read the marker before the main process touches the directory
    if main and cfg.resume and reused is None:  # killed while sampling: whatever it left is not trusted
        for name in GENERATION_FILES:
            (output_dir / name).unlink(missing_ok=True)

    if reused is not None:
        summary = dict(reused)
        if main:
            print(f"reusing the complete samples in {output_dir} ({GENERATION_MARKER}); not sampling again")
            print(describe(summary))
    else:
        model = load_sft_model(cfg, init_kind)
        started = time.perf_counter()
        rows = sample_and_score(model, tokenizer, prompts, stop_token_ids(template, tokenizer), cfg.sampling, scorer)
        sampling_seconds = time.perf_counter() - started
        del model
        gc.collect()

        kept, pairs = select(rows, cfg.rejection, cfg.score.verifier)
        summary = {"init": cfg.init, "scorer": scorer.name, "num_processes": state.num_processes,
                   "skipped_prompts": len(skipped), "sampling_seconds": sampling_seconds,
                   **sample_figures(rows, kept, pairs, len(prompts))}
        if main:
            write_outputs(output_dir, rows, kept, pairs if cfg.rejection.preference_pairs else None)
            write_generation_marker(output_dir, cfg, summary)  # last: the outputs above are complete
            print(describe(summary))
    state.wait_for_everyone()

    if not cfg.generate_only:
        if not summary["kept_samples"]:
            raise ConfigError(
                "no sample was kept, so there is nothing to fine-tune on; lower rejection.threshold or "
                "rejection.min_score, sample more (sampling.num_samples), or pass --generate_only"
            )
        # The fine-tune resumes only on top of reused samples: fresh samples make any old checkpoint stale.
        sft_resume = reused is not None and latest_complete_checkpoint(output_dir / "sft") is not None
        result = sft.run(sft_config(cfg, output_dir, resume=sft_resume))
        summary["sft_output_dir"] = str(output_dir / "sft")
        for key in ("base_eval_accuracy", "base_eval_loss"):
            if key in result:
                summary[key.replace("base_", "init_")] = result[key]
        for key in ("eval_accuracy", "eval_loss", "train_loss", "train_steps", "train_seconds"):
            if key in result:
                summary[key] = result[key]
    return Trained(summary)  # the fine-tuned model is the SFT run's, in OUTPUT_DIR/sft


def check(cfg: RejectionSamplingRunConfig) -> None:
    """The fine-tune's trainer arguments, pass-through included, build: a typo in ``trainer.*`` fails before
    sampling, not after it."""
    from ..stages import sft

    sft.check(sft_config(cfg, Path(cfg.output_dir)))


STAGE = Stage("rejection_sampling", load_data, train, resolve=resolve, has_progress=has_progress, check=check)


def run(cfg: RejectionSamplingRunConfig) -> dict:
    """Sample, score, select, write; then fine-tune with the SFT stage unless ``generate_only``. Returns the summary
    also written to ``summary.json``."""
    return run_stage(cfg, STAGE).summary


def describe(summary: dict) -> str:
    """The sampling figures in two lines, as the recipe prints them."""
    kept_mean = summary["mean_score_kept"]
    kept_text = f"{kept_mean:.3f} (kept)" if kept_mean is not None else "nothing kept"
    return (
        f"sampled {summary['num_samples']} responses for {summary['num_prompts']} prompts: mean score "
        f"{summary['mean_score_all']:.3f} (all), {kept_text}\n"
        f"kept {summary['kept_samples']} samples; {summary['prompts_kept_nothing']} prompts kept nothing; "
        f"{summary['preference_pairs']} preference pairs"
    )


def results_table(summary: dict) -> str:
    """SFT model against the rejection-sampling fine-tune, as the recipe prints it at the end."""
    rows = [("verifier accuracy", "init_eval_accuracy", "eval_accuracy"), ("eval loss", "init_eval_loss", "eval_loss")]
    return two_column_table(("SFT", "RS"), [(label, summary.get(before), summary.get(after))
                                            for label, before, after in rows if before in summary or after in summary])
