"""Pretrain a causal or masked XArch language model from scratch (the logic: ``hf_xarch/train/pretrain.py``).

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_clm.yaml training.max_steps=500
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/pretrain.py   # 2 CPU processes (gloo)
    hf-xarch pretrain --config recipes/configs/pretrain_mlm.yaml
"""

import sys

from hf_xarch.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))  # one-line errors and --debug, as hf-xarch pretrain
