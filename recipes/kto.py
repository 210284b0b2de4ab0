"""Kahneman-Tversky optimisation of an SFT policy on unpaired examples, the SFT adapter frozen on the same base as
the reference.

    accelerate launch recipes/sft.py                                     # first: SFT on the embedded default -> runs/sft
    accelerate launch recipes/kto.py --init runs/sft                     # KTO from runs/sft on the bundled pairs, split
    accelerate launch recipes/kto.py --config recipes/configs/tiny/kto_lora.yaml          # the same, as a file
    accelerate launch recipes/kto.py --init runs/sft --data.train=my_labels.jsonl --data.eval=null
    accelerate launch recipes/kto.py --config recipes/configs/llama3_8b/kto_qlora.yaml --init runs/llama3_8b-sft

Data: TRL's unpaired format (prompt, completion, label: true/false), or preference pairs, each split into its chosen
reply (desirable) and its rejected reply (undesirable). Options: --config FILE.yaml, --init DIR (required),
--output_dir DIR, --resume, --overwrite, --section.key=value (see --help).
"""

import sys

from finetune.config import KTORunConfig
from finetune.launch import kto_main as main
from finetune.launch import launch

if __name__ == "__main__":
    sys.exit(launch(KTORunConfig, main))
