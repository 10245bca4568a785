"""Compare XArch configurations on the same data at equal compute (the logic: ``hf_xarch/compare/``).

    hf-xarch compare --config recipes/configs/compare.yaml
    accelerate launch recipes/compare.py --config recipes/configs/compare_positions.yaml budget.train_tokens=1000000
    python recipes/compare.py --config recipes/configs/compare.yaml evaluation.lengths=[128,256,512,1024]
"""

import sys

from hf_xarch.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))  # one-line errors and --debug, as hf-xarch compare
