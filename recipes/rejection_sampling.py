"""Rejection sampling from an SFT run: K samples per prompt, scored by a verifier and/or a reward model; the best are
kept (and best-vs-worst preference pairs written), then the SFT adapter is fine-tuned on them with the SFT stage.

    accelerate launch recipes/rejection_sampling.py --init runs/sft                 # tiny LLaMA, bundled suite, CPU
    accelerate launch recipes/rejection_sampling.py --config recipes/configs/tiny/rejection_sampling.yaml  # the same
    accelerate launch recipes/rejection_sampling.py --init runs/sft --score.reward_model=runs/reward --generate_only

Writes OUTPUT_DIR/samples.jsonl, kept.jsonl (chat messages + score), pairs.jsonl (for recipes/dpo.py) and
summary.json; the fine-tuned adapter goes to OUTPUT_DIR/sft (chain on with --init OUTPUT_DIR/sft).
--resume continues a killed run: complete samples (generation_complete.json) are reused, and the fine-tune resumes
from its newest complete checkpoint.
Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --generate_only,
--section.key=value (--help).
"""

import sys

from finetune.config import RejectionSamplingRunConfig
from finetune.launch import launch
from finetune.launch import rejection_sampling_main as main

if __name__ == "__main__":
    sys.exit(launch(RejectionSamplingRunConfig, main))
