"""RLOO from an SFT run, without a critic: the GRPO stage (recipes/grpo.py) with RLOO's defaults: each response's
advantage is its score minus the mean of the other responses to its prompt, and the KL to the reference (the SFT
adapter, frozen) is a per-token penalty in the reward.

    accelerate launch recipes/rloo.py --init runs/sft                                  # tiny LLaMA, verifier reward
    accelerate launch recipes/rloo.py --config recipes/configs/tiny/rloo_lora.yaml                 # the same, as a file

Writes what recipes/grpo.py writes, under runs/rloo by default.
Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
"""

import sys

from finetune.config import RLOORunConfig
from finetune.launch import grpo_main as main
from finetune.launch import launch

if __name__ == "__main__":
    sys.exit(launch(RLOORunConfig, main))
