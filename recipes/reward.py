"""Bradley-Terry reward model: the LLaMA backbone with a LoRA adapter and a scalar head, on preference pairs.

    accelerate launch recipes/reward.py --init runs/sft                  # tiny LLaMA from the SFT run, bundled pairs, CPU
    accelerate launch recipes/reward.py --config recipes/configs/tiny/reward_lora.yaml     # the same, as a file
    accelerate launch recipes/reward.py --config recipes/configs/llama3_8b/reward_qlora.yaml

Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
Score with it: ``finetune.reward_model.load_reward_model(output_dir).score(conversations)``.
"""

import sys

from finetune.config import RewardRunConfig
from finetune.launch import launch
from finetune.launch import reward_main as main

if __name__ == "__main__":
    sys.exit(launch(RewardRunConfig, main))
