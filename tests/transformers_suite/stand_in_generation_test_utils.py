"""Stand-in for transformers' ``tests/generation/test_utils.py`` (absent from the sdist).

``test_modeling_common`` imports ``GenerationTesterMixin`` only to check, in ``test_generation_tester_mixin_inheritance``,
that a test class whose models can ``generate()`` inherits it (so that generation is tested somewhere). Upstream's mixin
carries the generation tests; ours are written for XArch in ``tests/test_generation.py`` (greedy, sampling, beam search,
cached decoding == full forward, left padding), so this marker class only records that the decoder test class is
covered there.
"""


class GenerationTesterMixin:
    """Marker: the test class's generative models are covered by ``tests/test_generation.py``."""

    generation_tests_live_in = "tests/test_generation.py"
