"""Extend a RoPE model's context, fine-tune at the new length, and report perplexity at each length before and after
(the logic: ``hf_xarch/train/extend_context.py``).

    accelerate launch recipes/extend_context.py --config recipes/configs/extend_context.yaml base_model=runs/pretrain_clm
    hf-xarch extend-context factor=4 rope_type=yarn
"""

import sys

from hf_xarch.cli import main

if __name__ == "__main__":
    sys.exit(main(["extend-context", *sys.argv[1:]]))  # one-line errors and --debug, as hf-xarch extend-context
