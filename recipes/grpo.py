"""GRPO from an SFT run, without a critic: policy, reference (the SFT adapter, frozen) and optionally a reward model
as adapters on one base (LoRA, or QLoRA with the base in 4-bit); G samples per prompt, each response's advantage
taken against its group; the reward is a verifier, a reward model, or both. RLOO is the same stage with the
leave-one-out baseline (recipes/rloo.py, or --grpo.advantage=leave_one_out --grpo.scale_advantages=false).

    accelerate launch recipes/grpo.py --init runs/sft                                  # tiny LLaMA, verifier reward
    accelerate launch recipes/grpo.py --config recipes/configs/tiny/grpo_lora.yaml                 # the same, as a file
    accelerate launch recipes/grpo.py --config recipes/configs/llama3_8b/grpo_qlora.yaml

Writes OUTPUT_DIR/metrics.jsonl (per iteration: score, KL to the reference, policy loss, clip fraction, entropy,
the fraction of groups of equal scores, response length), rollouts.jsonl, summary.json (with verifier accuracy
against the SFT model's), the policy adapter (chain on with --init OUTPUT_DIR), and checkpoint-N/ every
grpo.save_every iterations; --resume continues from the newest complete one.
Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
"""

import sys

from finetune.config import GRPORunConfig
from finetune.launch import grpo_main as main
from finetune.launch import launch

if __name__ == "__main__":
    sys.exit(launch(GRPORunConfig, main))
