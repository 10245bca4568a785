"""XArch encoder-decoder models (``is_encoder_decoder=True``): T5 and BART's layout over two XArch stacks.

``XArchSeq2SeqModel`` holds an encoder (``XArchModel`` of ``config.stack_config("encoder")``: any attention family,
global tokens, any position scheme) and a decoder (``XArchModel`` of ``config.stack_config("decoder")``: causal
self-attention of ``decoder_attention_type`` and full cross-attention to the encoder output in every block). The two
share one token embedding (and its factorization), which ``XArchForConditionalGeneration`` ties to its LM head.
``AutoModel`` builds ``XArchSeq2SeqModel`` for an encoder-decoder config (``XArchModel.__new__``).

Caches are transformers' ``EncoderDecoderCache``: the decoder's self-attention layers (as ``DynamicCache(config=...)``
builds them for its layer types) and the cross-attention keys and values, projected once per generation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_xarch import XArchConfig
from .modeling_xarch import Head, XArchForCausalLM, XArchModel, XArchPreTrainedModel


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``decoder_start_token_id`` then the labels but the last, -100 as padding."""
    if decoder_start_token_id is None:
        raise ValueError("decoder_start_token_id: the config needs one to build decoder inputs from labels "
                         "(BART: eos_token_id, T5: pad_token_id)")
    if pad_token_id is None and bool((labels == -100).any()):
        raise ValueError("pad_token_id: the config needs one to replace the labels' -100 in the decoder inputs")
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id if pad_token_id is not None else 0)


class XArchSeq2SeqModel(XArchModel):
    """The bare encoder-decoder: ``encoder`` and ``decoder`` stacks with shared token embeddings. Its output is the
    decoder's last hidden state, with the encoder's (``Seq2SeqModelOutput``)."""

    # decoder -> encoder (target -> source, transformers' order); the projection only when factorized
    _tied_weights_keys = {f"decoder.embeddings.{name}": f"encoder.embeddings.{name}"
                          for name in ("word_embeddings.weight", "projection.weight", "projection.bias")}

    def __init__(self, config: XArchConfig):
        if not config.is_encoder_decoder:
            raise ValueError("XArchSeq2SeqModel needs is_encoder_decoder=True (XArchModel builds a single stack)")
        config.check_all()
        XArchPreTrainedModel.__init__(self, config)
        self.encoder = XArchModel(config.stack_config("encoder"))
        self.decoder = XArchModel(config.stack_config("decoder"))
        self.share_embeddings()
        self.post_init()

    def share_embeddings(self) -> None:
        """One token table (and E -> H projection when factorized) for both stacks, as BART's and T5's `shared`."""
        source, target = self.encoder.embeddings, self.decoder.embeddings
        target.word_embeddings = source.word_embeddings
        target.projection = source.projection

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings.word_embeddings = value
        self.decoder.embeddings.word_embeddings = value

    def get_encoder(self, modality: str | None = None):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """The decoder's embedding weights are the encoder's whatever ``tie_word_embeddings`` says (that one is about
        the LM head), so transformers saves them once and ties them again at load."""
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        names = dict(self.named_parameters(remove_duplicate=False))
        return {target: source for target, source in self._tied_weights_keys.items() if target in names}

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        r"""
        input_ids, attention_mask, inputs_embeds, global_attention_mask, token_type_ids, position_ids: the encoder's
            inputs, as `XArchModel` takes them (global tokens for a sliding-window encoder).
        decoder_input_ids (`torch.LongTensor` of shape `(batch, target)`): the decoder's inputs; without them (and
            without `decoder_inputs_embeds`) `input_ids` shifted right behind `decoder_start_token_id`, as BART does.
        decoder_attention_mask (`torch.Tensor` of shape `(batch, past + target)`, *optional*): decoder padding.
        encoder_outputs (`BaseModelOutput` or tuple, *optional*): a finished encoder pass (`generate()` passes it).
        cache (`EncoderDecoderCache`, *optional*): decoder self-attention and cross-attention caches.
        """
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("decoder_input_ids: give them (or decoder_inputs_embeds, or input_ids to shift)")
            decoder_input_ids = shift_tokens_right(input_ids, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                token_type_ids=token_type_ids,
                global_attention_mask=global_attention_mask,
                **kwargs,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class XArchForConditionalGeneration(XArchPreTrainedModel, GenerationMixin):
    """Encoder-decoder LM (T5, BART): ``XArchSeq2SeqModel`` and an LM head over the decoder's last hidden state,
    tied to the shared token embedding (``tie_word_embeddings``); with factorized embeddings the hidden state is
    projected to ``embedding_size`` first. ``labels`` give the loss and, shifted behind ``decoder_start_token_id``,
    the decoder inputs. ``generate()`` (greedy, sampling, beam search) works as with transformers' own
    encoder-decoders (transformers 5 has no ``summarization``/``translation``/``text2text-generation`` pipelines:
    tokenize, ``generate()``, ``batch_decode``)."""

    _tied_weights_keys = {"lm_head.weight": "model.encoder.embeddings.word_embeddings.weight"}
    # the families build their masks from the 2-d padding mask in every forward (see XArchForCausalLM's)
    create_masks_for_generate = staticmethod(XArchForCausalLM.create_masks_for_generate)

    def __init__(self, config: XArchConfig):
        if not config.is_encoder_decoder:
            raise ValueError("XArchForConditionalGeneration needs is_encoder_decoder=True (an encoder and a decoder)")
        super().__init__(config)
        self.model = XArchModel(config)
        self.lm_head_projection = (
            nn.Linear(config.hidden_size, config.embedding_size, bias=False)
            if config.embedding_size != config.hidden_size
            else None
        )
        self.lm_head = nn.Linear(config.embedding_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_encoder(self, modality: str | None = None):
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        global_attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        r"""labels (`torch.LongTensor` of shape `(batch, target)`): the target tokens (-100 ignored); without
        `decoder_input_ids` they are also the decoder inputs, shifted right behind `decoder_start_token_id`. The
        other arguments are `XArchSeq2SeqModel`'s."""
        if labels is not None:
            use_cache = False  # teacher forcing sees the whole target at once: nothing to cache
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            global_attention_mask=global_attention_mask,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep, :]
        if self.lm_head_projection is not None:
            hidden_states = self.lm_head_projection(hidden_states)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = ForMaskedLMLoss(logits, labels, self.config.vocab_size, **kwargs)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


# the heads of this file, as modeling_xarch.HEADS lists the others: hf_xarch registers both with the Auto classes
SEQ2SEQ_HEADS = (Head(XArchForConditionalGeneration, "AutoModelForSeq2SeqLM", "text2text-generation"),)
for _head in SEQ2SEQ_HEADS:
    _head.model_class.register_for_auto_class(_head.auto_class)
del _head

__all__ = ["SEQ2SEQ_HEADS", "XArchForConditionalGeneration", "XArchSeq2SeqModel", "shift_tokens_right"]
