"""`hf-xarch compare`: several XArch configurations trained on the same data at equal compute and measured side by
side (see `recipe` for the steps, `measure` for what is measured, `report` for the files and the written summary)."""

from .recipe import DEFAULTS, run_compare

__all__ = ["DEFAULTS", "run_compare"]
