"""Stand-in for transformers' ``tests/exporters/test_export.py`` (absent from the sdist).

``ModelTesterMixin`` inherits ``ExportTesterMixin``; upstream's runs each model class through ``torch.export`` (and
ONNX / ExecuTorch when installed). This stand-in keeps the part that needs nothing beyond torch: every model class
exports with ``torch.export.export`` (non-strict, as transformers exports), and the exported program gives eager's
outputs on the inputs it was traced with AND on fresh inputs of the same shape (so a program that froze its example
inputs in as constants fails). Like upstream's non-generative export tests, the models run with ``use_cache=False``:
exporting a decoding step with its cache is generation's business (``tests/test_generation.py``).
"""

from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_leaves


def _float_leaves(outputs) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


class ExportTesterMixin:
    """Expects the host class to provide ``all_model_classes``, ``model_tester``, ``test_torch_exportable`` and
    ``_prepare_for_class`` (as ``ModelTesterMixin`` does)."""

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="test_torch_exportable is False for this test class")
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.use_cache = False
        _, fresh_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(copy.deepcopy(config)).eval()
                inputs = self._prepare_for_class(inputs_dict, model_class)
                fresh = self._prepare_for_class(fresh_dict, model_class)
                with torch.no_grad():
                    program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                    for example in (inputs, fresh):
                        expected = _float_leaves(model(**example))
                        actual = _float_leaves(program.module()(**example))
                        self.assertEqual(len(actual), len(expected), "the exported program returns other outputs")
                        for got, want in zip(actual, expected):
                            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
