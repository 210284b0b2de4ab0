"""What every recipe runs: parse the config, check it, run the stage, print its figures, and turn user mistakes into
one line on stderr with exit status 2 instead of a stack trace. Under ``accelerate launch`` or ``torchrun`` the
launcher's own report of the failed process is kept to that line too (``finetune.launcher_exit``).

The stages' ``main`` functions live here, so ``recipes/NAME.py`` (in a checkout) and ``finetune NAME`` (the
installed console script, also ``accelerate launch -m finetune.cli NAME``) run the same code: see :data:`STAGES`.
Each imports its stage inside, so a config error is reported before torch loads."""

from __future__ import annotations

import os
from collections.abc import Callable

from .config import (
    ConfigError,
    DPORunConfig,
    GRPORunConfig,
    KTORunConfig,
    PipelineRunConfig,
    PPORunConfig,
    RejectionSamplingRunConfig,
    RewardRunConfig,
    RLOORunConfig,
    SFTRunConfig,
    parse_args,
    unmatched_target_modules,
)
from .launcher_exit import EXIT_USER_ERROR, report_in_child

# A half-configured environment should not make a recipe wait on the network for a model id.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (not a bug): reported in one line."""
    from data_formats import DataFormatError

    from .runs import NonFiniteLossError
    from .templates import TemplateError

    return (ConfigError, DataFormatError, NonFiniteLossError, TemplateError)


def launch(config_cls: type, main: Callable, argv: list[str] | None = None) -> int:
    """Parse ``argv`` into ``config_cls`` and call ``main(cfg)``; returns the process exit status."""
    try:
        cfg = parse_args(config_cls, argv)
        check_before_run(cfg)
        main(cfg)
    except ConfigError as e:  # before the other user errors, whose classes import torch
        return report_user_error(e)
    except Exception as e:
        if isinstance(e, user_errors()):
            return report_user_error(e)
        raise
    return 0


def report_user_error(error: BaseException) -> int:
    """Report ``error`` as one ``error: ...`` line (``finetune.launcher_exit.report_in_child``); the exit status."""
    report_in_child(f"error: {' '.join(str(error).split())}")
    return EXIT_USER_ERROR


def check_before_run(cfg) -> None:
    """The checks a config needs the model or its ``init`` run for, made before the stage starts and so before it
    writes anything: the init run's files are readable and agree with each other, the model (or the full-weights
    init) can be found, and a new adapter's ``target_modules`` each match a module of it."""
    from .run_dir import open_run

    if not hasattr(cfg, "adapter"):  # the pipeline: each of its stages is checked when it starts
        return
    init = getattr(cfg, "init", None)
    kind = open_run(init).kind if init else None  # a missing, unfinished or damaged run is one line here
    source, key = (init, "--init") if kind == "full" else (cfg.model.name, "model.name")
    names = module_names(source, key)
    if cfg.adapter.method != "full" and kind != "adapter":  # a new adapter (an init adapter keeps its own shape)
        unmatched = unmatched_target_modules(cfg.adapter.target_modules, names)
        if unmatched:
            linear = sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(source)})
            raise ConfigError(f"adapter.target_modules: {', '.join(map(repr, unmatched))} match no module of "
                              f"{source}; its linear modules are {', '.join(linear)}")


def _model_on_meta(source: str, key: str):
    """The model ``source`` names, built on the meta device from its config alone (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(source))
    except (OSError, ValueError) as e:  # transformers raises either for a path or id it cannot load
        raise ConfigError(f"{key}: cannot load a model config from {source!r}: {' '.join(str(e).split())[:300]}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def module_names(source: str, key: str) -> list[str]:
    """Every module's dotted name in the model ``source`` names."""
    return [name for name, _ in _model_on_meta(source, key).named_modules()]


def linear_module_names(source: str) -> list[str]:
    """The dotted names of the model's linear layers (what LoRA usually targets)."""
    import torch

    return [name for name, module in _model_on_meta(source, "model.name").named_modules()
            if isinstance(module, torch.nn.Linear)]


def sft_main(cfg: SFTRunConfig) -> dict:
    """Config -> tokenizer and template -> data -> base model and adapter -> train -> evaluate -> save."""
    from .runs import process_state
    from .stages import sft

    summary = sft.run(cfg)
    if process_state().is_main_process:  # every process returns the summary; print it once
        print(sft.before_after_table(summary))
    return summary


def reward_main(cfg: RewardRunConfig) -> dict:
    """Config -> tokenizer and template -> pairs -> backbone, head and adapter -> train -> pairwise eval -> save."""
    from .runs import process_state
    from .stages import reward

    summary = reward.run(cfg)
    if process_state().is_main_process:
        for key in ("init_eval_accuracy", "eval_accuracy", "eval_margin", "eval_loss"):
            if key in summary:
                print(f"{key}: {summary[key]:.4f}")
    return summary


def rejection_sampling_main(cfg: RejectionSamplingRunConfig) -> dict:
    """Config -> SFT run on one base -> K samples per prompt -> scores -> kept samples and pairs -> SFT stage."""
    from .runs import process_state
    from .stages import rejection_sampling

    summary = rejection_sampling.run(cfg)
    if not cfg.generate_only and process_state().is_main_process:
        print(rejection_sampling.results_table(summary))
    return summary


def dpo_main(cfg: DPORunConfig) -> dict:
    """Config -> SFT run -> tokenizer and template -> pairs -> base + policy/reference adapters -> train -> save."""
    from .runs import process_state
    from .stages import dpo

    summary = dpo.run(cfg)
    if process_state().is_main_process:
        for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "init_eval_accuracy", "eval_accuracy"):
            if key in summary:
                print(f"{key}: {summary[key]:.4f}")
    return summary


def kto_main(cfg: KTORunConfig) -> dict:
    """Config -> SFT run -> tokenizer and template -> unpaired examples -> base + policy/reference adapters -> train
    -> save."""
    from .runs import process_state
    from .stages import kto

    summary = kto.run(cfg)
    if process_state().is_main_process:
        for key in ("eval_loss", "eval_reward_margin", "eval_kl", "init_eval_accuracy", "eval_accuracy"):
            if summary.get(key) is not None:
                print(f"{key}: {summary[key]:.4f}")
    return summary


def ppo_main(cfg: PPORunConfig) -> dict:
    """Config -> base + policy/reference/value/reward adapters -> rollouts, scores, GAE, clipped updates -> save."""
    from .runs import process_state
    from .stages import ppo

    summary = ppo.run(cfg)
    if process_state().is_main_process:  # every process returns the summary; print once
        print(ppo.results_table(summary))
    return summary


def grpo_main(cfg: GRPORunConfig) -> dict:
    """Config -> base + policy/reference/reward adapters -> G samples per prompt, group advantages, clipped updates
    -> save (GRPO, or RLOO with ``grpo.advantage=leave_one_out``)."""
    from .runs import process_state
    from .stages import grpo

    summary = grpo.run(cfg)
    if process_state().is_main_process:
        print(grpo.results_table(summary))
    return summary


def pipeline_main(cfg: PipelineRunConfig) -> dict:
    """Config -> every stage config checked -> rounds of reward, rejection sampling, SFT, DPO or PPO, averaging and
    the gate, each stage with the code above -> manifests, summary table and plot."""
    from . import pipeline
    from .runs import process_state

    summary = pipeline.run(cfg)
    if process_state().is_main_process:
        print(pipeline.summary_table(summary["rounds"]))
        print(pipeline.final_model_lines(summary))
    return summary


# Command name (``finetune NAME``) -> (config class, main, one line for --help), in the order of the loop.
STAGES: dict[str, tuple[type, Callable, str]] = {
    "sft": (SFTRunConfig, sft_main, "supervised fine-tuning (LoRA, QLoRA or full); the tiny model by default"),
    "reward": (RewardRunConfig, reward_main, "Bradley-Terry reward model on preference pairs"),
    "rejection-sampling": (RejectionSamplingRunConfig, rejection_sampling_main,
                           "K samples per prompt from an SFT run, scored; the best fine-tuned on"),
    "dpo": (DPORunConfig, dpo_main, "preference optimisation on pairs from an SFT run (DPO and variants, ORPO, SimPO)"),
    "kto": (KTORunConfig, kto_main, "KTO on unpaired desirable/undesirable examples from an SFT run"),
    "ppo": (PPORunConfig, ppo_main, "PPO with a critic from an SFT run"),
    "grpo": (GRPORunConfig, grpo_main, "GRPO (group-relative advantages, no critic) from an SFT run"),
    "rloo": (RLOORunConfig, grpo_main, "RLOO (leave-one-out baseline, no critic) from an SFT run"),
    "pipeline": (PipelineRunConfig, pipeline_main,
                 "rounds of reward model, rejection sampling, SFT, DPO (or PPO), averaging and an evaluation gate"),
}


def run_stage(name: str, argv: list[str] | None = None) -> int:
    """``finetune NAME ARGV``: the stage's config from ``argv`` (``--config``, ``--section.key=value``, ...), run;
    the exit status."""
    config_cls, main, _ = STAGES[name]
    return launch(config_cls, main, argv)
