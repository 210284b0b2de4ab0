"""Direct preference optimisation of an SFT policy, the SFT adapter frozen on the same base as the reference.

    accelerate launch recipes/sft.py                                     # first: SFT on the embedded default -> runs/sft
    accelerate launch recipes/dpo.py --config recipes/configs/tiny/dpo_lora.yaml          # DPO from runs/sft, CPU
    accelerate launch recipes/dpo.py --init runs/sft --dpo.loss=ipo --dpo.beta=0.5
    accelerate launch recipes/dpo.py --config recipes/configs/llama3_8b/dpo_qlora.yaml --init runs/llama3_8b-sft

Options: --config FILE.yaml, --init DIR (required), --output_dir DIR, --resume, --overwrite, --section.key=value
(see --help).
"""

import sys

from finetune.config import DPOConfig
from finetune.recipe import launch


def main(cfg: DPOConfig) -> dict:
    """Config -> SFT run -> tokenizer and template -> pairs -> base + policy/reference adapters -> train -> save."""
    from finetune.runs import process_state  # here, so a config error is reported before torch loads
    from finetune.stages import dpo

    summary = dpo.run(cfg)
    if process_state().is_main_process:  # every process returns the summary; print it once
        for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "init_eval_accuracy", "eval_accuracy"):
            if key in summary:
                print(f"{key}: {summary[key]:.4f}")
    return summary


if __name__ == "__main__":
    sys.exit(launch(DPOConfig, main))
