"""Direct preference optimisation of an SFT policy, the SFT adapter frozen on the same base as the reference.

    accelerate launch recipes/sft.py                                     # first: SFT on the embedded default -> runs/sft
    accelerate launch recipes/dpo.py --init runs/sft                     # DPO from runs/sft on the bundled pairs, CPU
    accelerate launch recipes/dpo.py --config recipes/configs/tiny/dpo_lora.yaml          # the same, as a file
    accelerate launch recipes/dpo.py --init runs/sft --dpo.loss=ipo --dpo.beta=0.5
    accelerate launch recipes/dpo.py --config recipes/configs/llama3_8b/dpo_qlora.yaml --init runs/llama3_8b-sft

Options: --config FILE.yaml, --init DIR (required), --output_dir DIR, --resume, --overwrite, --section.key=value
(see --help).
"""

import sys

from finetune.config import DPORunConfig
from finetune.launch import dpo_main as main
from finetune.launch import launch

if __name__ == "__main__":
    sys.exit(launch(DPORunConfig, main))
