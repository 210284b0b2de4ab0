"""The post-training loop in rounds, Llama 3 style: reward model (optional), rejection sampling from the current
model, SFT on the kept samples, DPO on the model's own best-against-worst pairs, averaging, an evaluation gate.

    accelerate launch recipes/pipeline.py                                # the tiny default: SFT, then 2 rounds, CPU
    accelerate launch recipes/pipeline.py --init runs/sft --rounds=3     # from an existing SFT run
    accelerate launch recipes/pipeline.py --style=llama2                 # rounds of rejection sampling + PPO
    accelerate launch recipes/pipeline.py --resume                       # after a kill: finished stages skipped
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/pipeline.py --config recipes/configs/llama3_8b/pipeline_qlora.yaml

Options: --config FILE.yaml, --init DIR, --output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
Each stage runs with its own recipe's code into OUTPUT_DIR/round-N/STAGE; see docs/pipeline.md.
"""

import sys

from finetune.config import PipelineRunConfig
from finetune.launch import launch
from finetune.launch import pipeline_main as main

if __name__ == "__main__":
    sys.exit(launch(PipelineRunConfig, main))
