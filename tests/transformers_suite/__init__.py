"""Running transformers' own model test suite (``ModelTesterMixin``, ``ConfigTester``) against XArch: the sdist
fetcher (``fetch.py``) and stand-ins for the test modules the sdist lacks."""
