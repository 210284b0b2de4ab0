"""DPO peak memory: policy and reference as two adapters on one base (``finetune.stages.dpo``) against SFT of the
same model and batch, and against DPO with a second, full reference model.

    python benchmarks/dpo_memory.py                 # CPU: peak resident memory of each arm's process
    python benchmarks/dpo_memory.py --device cuda   # GPU: peak allocated CUDA memory
    python benchmarks/dpo_memory.py --shape llama-3.2-1b   # Llama-3.2-1B's body (CPU: ~5 min, 9 GB of RAM)

The model and the stand-in SFT run are ``peak_memory``'s (52M-parameter LLaMA, fp32, LoRA r=16 on every linear).
Each arm runs in its own process and takes the same optimizer steps on the same bundled preference pairs (``--pairs``
per step, the shipped tiny configs' batch of 4, ``--steps`` steps), each continuing the SFT adapter:

- ``sft``: ``finetune.stages.sft.run`` itself on the pairs' prompt + chosen reply (not packed, so its batches are
  the same pairs' chosen sequences): one forward with gradients over ``pairs`` sequences.
- ``sft_both``: the same on both replies of each pair, ``2 x pairs`` sequences: DPO's forward with gradients without
  its reference, which tells how much of DPO's excess over ``sft`` the reference costs.
- ``dpo_shared``: ``finetune.stages.dpo.run`` itself: one base, the SFT adapter as the trainable policy and TRL's
  frozen ``ref`` copy of it for the reference forward; chosen and rejected make ``2 x pairs`` sequences.
- ``dpo_full_reference``: the stage's own pieces (``load_policy``, ``build_trainer``) with ``ref_model`` a second
  copy of the base with the SFT adapter merged in, as DPO without shared adapters holds it.

Every arm is measured without activation checkpointing (the tiny configs) and with full checkpointing (what
``llama3_8b/dpo_qlora.yaml`` turns on). The pairs are the suite's short ones (tens of tokens), so the frozen weights
are most of the peak; DPO's chosen + rejected sequences still carry twice SFT's activations, which a larger batch or
longer sequences make show more. Goal: DPO (shared) <= 1.15 x SFT.
Results go to ``benchmarks/results/dpo_memory_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from peak_memory import (
    ROOT,
    SHAPES,
    build_base_and_sft,
    measure,
    measure_description,
    model_description,
    processor_description,
    run_arm,
    write_results,
)

CONFIGS = ROOT / "recipes" / "configs" / "tiny"
PAIRS_FILE = "suite_preference_train.jsonl"
ARMS = ("sft", "sft_both", "dpo_shared", "dpo_full_reference")
LABELS = {
    "sft": "SFT on the chosen replies (finetune.stages.sft)",
    "sft_both": "SFT on the chosen and the rejected replies (DPO's sequences, no reference)",
    "dpo_shared": "DPO, policy + reference adapters on one base (finetune.stages.dpo)",
    "dpo_full_reference": "DPO with a second full reference model",
}
GOAL = 1.15


def common_args(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str) -> list[str]:
    """Overrides both stages take: the benchmark's base and SFT run, ``steps`` steps of ``pairs`` rows, the
    activation checkpointing mode, nothing evaluated or saved as a checkpoint (identical in every arm, and not what
    is measured)."""
    return ["--init", runs["sft"], "--model.name", runs["base"], "--output_dir", str(out), "--overwrite",
            f"--model.activation_checkpointing={checkpointing}",
            f"--data.max_train_samples={pairs * steps}", "--data.eval=null", f"--train.per_device_batch_size={pairs}",
            f"--train.max_steps={steps}", "--train.save_steps=100000", "--train.logging_steps=1",
            "--eval.verifier=null"]


def dpo_args(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str) -> list[str]:
    return ["--config", str(CONFIGS / "dpo_lora.yaml"), *common_args(runs, out, pairs, steps, checkpointing),
            f"--data.train=bundled:{PAIRS_FILE}"]


def sft_args(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str, both: bool = False) -> list[str]:
    """SFT on the pairs' chosen conversations, or with ``both`` on chosen and rejected (two rows per pair)."""
    rows = 2 * pairs if both else pairs
    return ["--config", str(CONFIGS / "sft_lora.yaml"), *common_args(runs, out, rows, steps, checkpointing),
            f"--data.train={runs['both' if both else 'chosen']}", "--data.packing=false"]


def write_conversations(chosen: Path, both: Path, count: int) -> None:
    """The first ``count`` bundled pairs as conversations, SFT's rows for the same pairs: prompt + chosen reply in
    ``chosen``; that and prompt + rejected reply, pair by pair, in ``both``."""
    from finetune.data import resolve_source

    lines = Path(resolve_source(f"bundled:{PAIRS_FILE}")).read_text().splitlines()[:count]
    with open(chosen, "w") as only, open(both, "w") as pairs:
        for line in lines:
            pair = json.loads(line)
            good, bad = (json.dumps({"messages": pair["prompt"] + pair[key]}) + "\n" for key in ("chosen", "rejected"))
            only.write(good)
            pairs.write(good + bad)


def arm_sft(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str) -> None:
    from finetune.config import SFTRunConfig, parse_args
    from finetune.stages import sft

    sft.run(parse_args(SFTRunConfig, sft_args(runs, out, pairs, steps, checkpointing)))


def arm_sft_both(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str) -> None:
    from finetune.config import SFTRunConfig, parse_args
    from finetune.stages import sft

    sft.run(parse_args(SFTRunConfig, sft_args(runs, out, pairs, steps, checkpointing, both=True)))


def arm_dpo_shared(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str) -> None:
    from finetune.config import DPORunConfig, parse_args
    from finetune.stages import dpo

    dpo.run(parse_args(DPORunConfig, dpo_args(runs, out, pairs, steps, checkpointing)))


def arm_dpo_full_reference(runs: dict, out: Path, pairs: int, steps: int, checkpointing: str) -> None:
    """``dpo.run``'s data, policy and trainer, with a separate merged reference model instead of the ``ref``
    adapter."""
    from transformers import set_seed

    from finetune.config import DPORunConfig, parse_args
    from finetune.data import load_preferences
    from finetune.models import load_adapter, load_base_model, load_tokenizer
    from finetune.preference_data import tokenize_pairs_for_dpo
    from finetune.run_dir import resolve_init
    from finetune.stages import dpo
    from finetune.templates import get_template

    cfg, init, _ = resolve_init(parse_args(DPORunConfig, dpo_args(runs, out, pairs, steps, checkpointing)))
    init_kind = init.kind
    tokenizer = load_tokenizer(cfg.model.name)
    template = get_template(cfg.data.template, tokenizer)
    train_pairs = load_preferences(cfg.data.train, cfg.data.format, cfg.data.split, cfg.data.max_train_samples)
    rows, _ = tokenize_pairs_for_dpo(train_pairs, template, tokenizer, cfg.data.max_length)
    set_seed(cfg.train.seed)
    policy, peft_config = dpo.load_policy(cfg, init_kind)
    reference = load_adapter(load_base_model(cfg.model, for_training=False), cfg.init).merge_and_unload().eval()
    reference.requires_grad_(False)
    dpo.build_trainer(cfg, policy, peft_config, tokenizer, rows, [], out, ref_model=reference).train()


def child(arm: str, runs_json: str, out: str, pairs: int, steps: int, checkpointing: str, device: str) -> None:
    # Every arm imports the same modules before the baseline is taken, so imports count in none.
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401  (both stages plot the loss at the end)
    import peft  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import finetune.stages.dpo  # noqa: F401
    import finetune.stages.sft  # noqa: F401

    fn = {"sft": arm_sft, "sft_both": arm_sft_both, "dpo_shared": arm_dpo_shared,
          "dpo_full_reference": arm_dpo_full_reference}[arm]
    measure(arm, lambda: fn(json.loads(runs_json), Path(out), pairs, steps, checkpointing), device)


def summarise(regimes: dict, device: str, base_parameters: int, pairs: int, steps: int, torch_version: str,
              shape: dict = SHAPES["52m"]) -> dict:
    """``regimes``: checkpointing mode -> arm -> the arm's ``RESULT``. Adds each arm's ratio to SFT and the verdict."""
    out = {}
    for mode, arms in regimes.items():
        ratios = {arm: arms[arm]["peak_mb"] / arms["sft"]["peak_mb"] for arm in arms}
        out[mode] = {"arms": arms, "ratio_to_sft": ratios, "goal_met": ratios["dpo_shared"] <= GOAL}
    return {
        "device": device,
        "processor": processor_description() if device == "cpu" else device,
        "measure": measure_description(device),
        "model": model_description(base_parameters, shape),
        "batch": f"{pairs} bundled preference pairs per step ({2 * pairs} sequences for DPO, the {pairs} chosen ones "
                 f"for SFT), {steps} optimizer steps",
        "torch": torch_version,
        "goal": f"dpo_shared <= {GOAL} x sft",
        "regimes": out,
    }


def table(result: dict) -> str:
    """A row per arm, a peak MB and x SFT column pair per activation checkpointing mode, a verdict per mode."""
    regimes = result["regimes"]
    modes = list(regimes)
    head = "| arm | " + " | ".join(f"peak MB, checkpointing {m} | x SFT" for m in modes) + " |"
    rule = "|---|" + "---:|---:|" * len(modes)
    rows = []
    for arm in ARMS:
        cells = []
        for m in modes:
            block = regimes[m]
            if arm in block["arms"]:
                cells.append(f"{block['arms'][arm]['peak_mb']:.0f} | {block['ratio_to_sft'][arm]:.2f}")
            else:
                cells.append("- | -")
        rows.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    lines = [
        f"DPO peak memory on {result['device']} ({result['processor']}), {result['model']}, {result['batch']} "
        f"({result['measure']})",
        "",
        head,
        rule,
        *rows,
        "",
    ]
    for m in modes:
        ratios = regimes[m]["ratio_to_sft"]
        verdict = "met" if regimes[m]["goal_met"] else "**not met**"
        line = (f"Activation checkpointing {m}: DPO (shared base) / SFT **{ratios['dpo_shared']:.2f}** "
                f"(goal <= {GOAL}: {verdict})")
        if "sft_both" in ratios:
            line += f"; / SFT on both replies {ratios['dpo_shared'] / ratios['sft_both']:.2f}"
        if "dpo_full_reference" in ratios:
            line += f"; / DPO with a full reference {ratios['dpo_shared'] / ratios['dpo_full_reference']:.2f}"
        lines.append(line + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per arm")
    parser.add_argument("--checkpointing", nargs="+", default=["none", "full"], choices=["none", "full", "selective"],
                        help="activation checkpointing modes to measure every arm under")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="52m",
                        help="the model's body (results of a shape other than 52m get the shape in their file name)")
    parser.add_argument("--child", nargs=4, metavar=("ARM", "RUNS", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arm, runs_json, out, mode = args.child
        child(arm, runs_json, out, args.pairs, args.steps, mode, args.device)
        return
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="dpo_memory_"))
    try:
        runs = build_base_and_sft(tmp, SHAPES[args.shape])
        runs["chosen"], runs["both"] = str(tmp / "chosen.jsonl"), str(tmp / "both.jsonl")
        write_conversations(Path(runs["chosen"]), Path(runs["both"]), args.pairs * args.steps)
        regimes = {}
        for mode in args.checkpointing:
            regimes[mode] = {}
            for arm in ARMS:
                regimes[mode][arm] = run_arm(__file__, [
                    "--device", args.device, "--pairs", str(args.pairs), "--steps", str(args.steps),
                    "--child", arm, json.dumps(runs), str(tmp / f"out-{mode}-{arm}"), mode])
                print(f"checkpointing {mode}, {arm}: {regimes[mode][arm]['peak_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = summarise(regimes, args.device, runs["base_parameters"], args.pairs, args.steps, torch.__version__,
                       SHAPES[args.shape])
    text = table(result)
    write_results("dpo_memory", args.device, result, text, "" if args.shape == "52m" else f"_{args.shape}")
    print(text)


if __name__ == "__main__":
    main()
