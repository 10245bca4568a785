"""Stand-in for transformers' ``tests/utils/test_configuration_utils.py`` (absent from the sdist).

``ConfigTester.check_config_arguments_init`` imports only ``config_common_kwargs``: every field of the base
``PreTrainedConfig`` set to a value that is NOT its default, so the check proves each one reaches the config through
the model's ``__init__``. The fields are those of transformers 5.x's ``PreTrainedConfig`` dataclass (the ones
``transformers_version``, ``is_encoder_decoder`` and private fields aside, as upstream leaves them out);
``test_config_common_kwargs_cover_the_base_config`` in ``tests/test_transformers_suite.py`` fails if a new
transformers adds a base field this dict does not cover.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",  # ConfigTester compares this one as torch.float16
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}

# base-config fields upstream's dict deliberately leaves out
NOT_COMMON_KWARGS = ("transformers_version", "is_encoder_decoder")
