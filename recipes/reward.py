"""Bradley-Terry reward model: the LLaMA backbone with a LoRA adapter and a scalar head, on preference pairs.

    accelerate launch recipes/reward.py                                  # tiny LLaMA, bundled pairs, CPU
    accelerate launch recipes/reward.py --config recipes/configs/tiny/reward_lora.yaml --init runs/sft
    accelerate launch recipes/reward.py --config recipes/configs/llama3_8b/reward_qlora.yaml

Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
Score with it: ``finetune.scoring.load_reward_model(output_dir).score(conversations)``.
"""

import sys

from finetune.config import RewardConfig
from finetune.recipe import launch


def main(cfg: RewardConfig) -> dict:
    """Config -> tokenizer and template -> pairs -> backbone, head and adapter -> train -> pairwise eval -> save."""
    from finetune.runs import process_state  # here, so a config error is reported before torch loads
    from finetune.stages import reward

    summary = reward.run(cfg)
    if process_state().is_main_process:  # every process returns the summary; print it once
        for key in ("init_eval_accuracy", "eval_accuracy", "eval_margin", "eval_loss"):
            if key in summary:
                print(f"{key}: {summary[key]:.4f}")
    return summary


if __name__ == "__main__":
    sys.exit(launch(RewardConfig, main))
