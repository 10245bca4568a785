"""Linearize a softmax LM: linear (or linear + sliding-window) attention with learned feature maps, attention transfer,
then LoRA (the logic: ``hf_xarch/train/linearize.py``).

    accelerate launch recipes/linearize.py --config recipes/configs/linearize.yaml base_model=runs/pretrain_clm
    hf-xarch linearize attention_type=linear feature_map=t2r
"""

import sys

from hf_xarch.cli import main

if __name__ == "__main__":
    sys.exit(main(["linearize", *sys.argv[1:]]))  # one-line errors and --debug, as hf-xarch linearize
