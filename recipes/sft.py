"""Supervised fine-tuning of a LLaMA with LoRA, QLoRA or full weights.

    accelerate launch recipes/sft.py                                     # tiny LLaMA, bundled suite, CPU
    accelerate launch recipes/sft.py --config recipes/configs/tiny/sft_qlora.yaml
    accelerate launch recipes/sft.py --config recipes/configs/llama3_8b/sft_qlora.yaml --train.learning_rate=1e-4

Options: --config FILE.yaml, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
"""

import sys

from finetune.config import SFTConfig
from finetune.recipe import launch


def main(cfg: SFTConfig) -> dict:
    """Config -> tokenizer and template -> data -> base model and adapter -> train -> evaluate -> save."""
    from finetune.runs import process_state  # here, so a config error is reported before torch loads
    from finetune.stages import sft

    summary = sft.run(cfg)
    if process_state().is_main_process:  # every process returns the summary; print it once
        print(sft.before_after_table(summary))
    return summary


if __name__ == "__main__":
    sys.exit(launch(SFTConfig, main))
