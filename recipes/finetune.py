"""Fine-tune for sequence or token classification, fully or with LoRA (the logic: ``hf_xarch/train/finetune.py``).

    accelerate launch recipes/finetune.py --config recipes/configs/finetune_sequence.yaml base_model=runs/pretrain_mlm
    accelerate launch recipes/finetune.py --config recipes/configs/finetune_token_lora.yaml
    hf-xarch finetune task=token lora.enabled=true
"""

import sys

from hf_xarch.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))  # one-line errors and --debug, as hf-xarch finetune
