"""Tokenizer vocabulary sweep: which algorithm and vocabulary size balance sequence length, unknowns and embedding cost.

    python recipes/vocab_sweep.py                                   # the default corpus, 3 algorithms x 1k..32k
    python recipes/vocab_sweep.py --config recipes/configs/vocab_sweep.yaml train_steps=300
    accelerate launch recipes/vocab_sweep.py --train-steps 300      # the LM step shared out among the processes

Everything lives in `hf_xarch.vocab` (see `hf_xarch/vocab/sweep.py` for the steps and every setting); this script only
hands over the command line, like `hf-xarch vocab-sweep`.
"""

import sys

from hf_xarch.cli import main

if __name__ == "__main__":
    sys.exit(main(["vocab-sweep", *sys.argv[1:]]))  # one-line errors and --debug, as hf-xarch vocab-sweep
