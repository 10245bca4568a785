"""The position schemes' records: what ``XArchConfig``, ``summary`` and the model card read of each (kind, bounds,
card text, citations), with no torch import. The modules are ``positions.py`` (learned, sinusoidal, rope) and
``position_alibi.py``; each completes its record with the ``init`` of its buffers when it registers.
"""

from __future__ import annotations

from .registry import PositionScheme, register_position_scheme

ROPE_CITATION = """@article{su2021roformer,
  title={RoFormer: Enhanced Transformer with Rotary Position Embedding}, author={Su, Jianlin and Lu, Yu and Pan, Shengfeng and Murtadha, Ahmed and Wen, Bo and Liu, Yunfeng},
  journal={arXiv:2104.09864}, year={2021}}"""
POSITION_INTERPOLATION_CITATION = """@article{chen2023extending,
  title={Extending Context Window of Large Language Models via Positional Interpolation}, author={Chen, Shouyuan and Wong, Sherman and Chen, Liangjian and Tian, Yuandong},
  journal={arXiv:2306.15595}, year={2023}}"""
YARN_CITATION = """@article{peng2023yarn,
  title={YaRN: Efficient Context Window Extension of Large Language Models}, author={Peng, Bowen and Quesnelle, Jeffrey and Fan, Honglu and Shippole, Enrico},
  journal={arXiv:2309.00071}, year={2023}}"""
ALIBI_CITATION = """@inproceedings{press2022train,
  title={Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation}, author={Press, Ofir and Smith, Noah A. and Lewis, Mike},
  booktitle={ICLR}, year={2022}}"""
NOPE_CITATION = """@inproceedings{haviv2022transformer,
  title={Transformer Language Models without Positional Encodings Still Learn Positional Information}, author={Haviv, Adi and Ram, Ori and Press, Ofir and Izsak, Peter and Levy, Omer},
  booktitle={Findings of EMNLP}, year={2022}}"""
BERT_CITATION = """@inproceedings{devlin2019bert,
  title={BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding}, author={Devlin, Jacob and Chang, Ming-Wei and Lee, Kenton and Toutanova, Kristina},
  booktitle={NAACL}, year={2019}}"""


def rope_card_details(config) -> str:
    rope = dict(config.rope_parameters)
    details = f"rope_type `{rope.get('rope_type', 'default')}`, theta {rope.get('rope_theta')}"
    if "factor" in rope:
        details += f", factor {rope['factor']}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        details += f", partial rotary {rope['partial_rotary_factor']}"
    return details


def rope_citations(config) -> tuple[str, ...]:
    extension = {"linear": POSITION_INTERPOLATION_CITATION, "yarn": YARN_CITATION}
    rope_type = config.rope_parameters.get("rope_type", "default")
    return (ROPE_CITATION, extension[rope_type]) if rope_type in extension else (ROPE_CITATION,)


LEARNED_SCHEME = register_position_scheme(
    PositionScheme(
        name="learned",
        kind="absolute",
        bounded=True,
        paper="Devlin et al. 2019 (BERT); Radford et al. 2019 (GPT-2)",
        description="a trained table of max_position_embeddings vectors added to the token embeddings",
        citations=lambda config: () if config.is_decoder else (BERT_CITATION,),
    )
)
SINUSOIDAL_SCHEME = register_position_scheme(
    PositionScheme(
        name="sinusoidal",
        kind="absolute",
        paper="Vaswani et al. 2017",
        description="fixed sin/cos features of the position (interleaved as in the paper) times a learned scale, "
        "added to the embeddings",
    )
)
ROPE_SCHEME = register_position_scheme(
    PositionScheme(
        name="rope",
        kind="rotary",
        paper="Su et al. 2021 (RoFormer); Chen et al. 2023 (position interpolation); Peng et al. 2023 (YaRN)",
        description="queries and keys rotated by position; rope_parameters picks the scaling (transformers' schema)",
        card_details=rope_card_details,
        citations=rope_citations,
    )
)
ALIBI_SCHEME = register_position_scheme(
    PositionScheme(
        name="alibi",
        kind="bias",
        paper="Press et al. 2022 (ALiBi); slopes as in BLOOM (BigScience 2022)",
        description="a per-head linear distance penalty added to attention scores; no position vectors, extrapolates",
        citations=lambda config: (ALIBI_CITATION,),
    )
)
NONE_SCHEME = register_position_scheme(
    PositionScheme(
        name="none",
        kind="none",
        paper="Haviv et al. 2022 (NoPE)",
        description="no position information",
        citations=lambda config: (NOPE_CITATION,),
    )
)
