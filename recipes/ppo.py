"""PPO from an SFT run with a critic, on accelerate: policy, reference, value and reward as adapters on one base
(LoRA, or QLoRA with the base in 4-bit); the reward is a verifier, a reward model, or both.

    accelerate launch recipes/ppo.py --init runs/sft                                   # tiny LLaMA, verifier reward
    accelerate launch recipes/ppo.py --config recipes/configs/tiny/ppo_lora.yaml                  # the same, as a file
    accelerate launch recipes/ppo.py --config recipes/configs/tiny/ppo_qlora.yaml --score.reward_model=runs/reward

Writes OUTPUT_DIR/metrics.jsonl (per iteration: score, KL to the reference, policy and value loss, clip fraction,
entropy, response length), rollouts.jsonl, summary.json (with verifier accuracy against the SFT model's), the
policy adapter (chain on with --init OUTPUT_DIR) and the value adapter and head under value/, and checkpoint-N/
every ppo.save_every iterations; --resume continues from the newest complete one.
Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
"""

import sys

from finetune.config import PPORunConfig
from finetune.launch import launch
from finetune.launch import ppo_main as main

if __name__ == "__main__":
    sys.exit(launch(PPORunConfig, main))
