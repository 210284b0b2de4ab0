"""Supervised fine-tuning of a LLaMA with LoRA, QLoRA or full weights.

    accelerate launch recipes/sft.py                                     # tiny LLaMA, bundled suite, CPU
    accelerate launch recipes/sft.py --config recipes/configs/tiny/sft_qlora.yaml
    accelerate launch recipes/sft.py --config recipes/configs/llama3_8b/sft_qlora.yaml --train.learning_rate=1e-4

Options: --config FILE.yaml, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
Installed from the wheel, every recipe is also a command: ``finetune sft ...``, ``accelerate launch -m finetune.cli
sft ...`` (and ``reward``, ``rejection-sampling``, ``dpo``, ``ppo``).
"""

import sys

from finetune.config import SFTRunConfig
from finetune.launch import launch
from finetune.launch import sft_main as main

if __name__ == "__main__":
    sys.exit(launch(SFTRunConfig, main))
