"""Turn a softmax XArch model (or any transformers model ``from_hf`` converts) into linear attention that keeps its
quality, as LoLCATs (Zhang et al. 2024) does: swap every attention layer for the ``linear`` or ``linear_sliding``
family keeping the q/k/v/o weights, train only the new feature maps (and window mixes) so that each layer's output
matches the softmax layer's (attention transfer), then fine-tune with LoRA.

    >>> from hf_xarch import linearize, attention_transfer
    >>> student = linearize(teacher, attention_type="linear_sliding", feature_map="hedgehog", window=64)
    >>> attention_transfer(student, teacher, batches, steps=200)     # the feature maps learn to mimic softmax

``hf-xarch linearize`` (``hf_xarch/train/linearize.py``) runs both stages, with LoRA through PEFT, as a recipe.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from hf_xarch.model.modeling_xarch import XArchPreTrainedModel
from hf_xarch.swap_attention import swap_attention

LINEAR_FAMILIES = ("linear", "linear_sliding")
# what linearize adds (everything else is the original's): the feature maps and the hybrid's window mixes
TRANSFER_PARAMETERS = (".feature_map.", ".window_mix")


def linearize(
    model: XArchPreTrainedModel | PreTrainedModel,
    attention_type: str = "linear_sliding",
    feature_map: str = "hedgehog",
    feature_dim: int | None = None,
    window: int = 64,
) -> XArchPreTrainedModel:
    """A new model of the same head whose every layer is ``attention_type`` (``linear`` or ``linear_sliding``) with
    ``feature_map``, keeping every weight of ``model`` (q/k/v/o included); the feature maps start at their
    initialisation (hedgehog: the identity) and the window mixes at an even split. A transformers model is converted
    first (``hf_xarch.convert.from_hf``). The input model is left unchanged."""
    if not isinstance(model, XArchPreTrainedModel):
        from hf_xarch.convert import from_hf

        model = from_hf(model)
    if attention_type not in LINEAR_FAMILIES:
        raise ValueError(f"linearize: attention_type={attention_type!r} is not allowed: one of {list(LINEAR_FAMILIES)}")
    config = model.config
    softmax = {family.name for family in config.layer_families()}
    if softmax != {"full"}:
        raise ValueError(
            f"linearize: the model's layers are {sorted(softmax)}; attention transfer needs softmax ('full') layers "
            "to learn from"
        )
    changes = {"attention_type": attention_type, "linear_feature_map": feature_map, "linear_feature_dim": feature_dim}
    if attention_type == "linear_sliding":
        changes["linear_window"] = window
    # a scheme or option the family cannot take fails in the config, naming the field
    new_model, lost, added = swap_attention(
        model, linearized_from=getattr(config, "_name_or_path", "") or config.model_type, **changes
    )
    if lost or any(not is_transfer_parameter(name) for name in added):
        raise ValueError(f"linearize: weights would be lost {lost} or added outside the feature maps {added}")
    return new_model


def is_transfer_parameter(name: str) -> bool:
    return any(part in name for part in TRANSFER_PARAMETERS)


def transfer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What attention transfer trains: the feature maps and the window mixes."""
    return [p for name, p in model.named_parameters() if is_transfer_parameter(name)]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of an XArch model (or of a wrapper holding one), in depth order."""
    return [module for name, module in model.named_modules() if name.endswith(".attention")
            and hasattr(module, "family")]


class LayerCapture:
    """Forward hooks on a softmax model's attention layers: each call's hidden states, position embeddings and
    output (what attention transfer matches the linear layer against)."""

    def __init__(self, layers: list[nn.Module]):
        self.records: list[tuple] = []
        self.handles = [layer.register_forward_hook(self.record) for layer in layers]

    def record(self, module, args, output):
        hidden, _, positions = args[:3]
        self.records.append((hidden, positions, output[0]))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def layer_outputs(student: nn.Module, teacher: nn.Module, input_ids, attention_mask=None):
    """Per layer: (the linear layer's output on the teacher layer's input, the teacher layer's output), from one
    teacher forward (no_grad) and one call of each linear layer: no backward through the whole model."""
    capture = LayerCapture(attention_layers(teacher))
    try:
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        capture.remove()
    pairs = []
    for layer, (hidden, positions, target) in zip(attention_layers(student), capture.records):
        mask = type(layer).build_mask(layer.config, hidden, attention_mask, None, None)
        pairs.append((layer(hidden, mask, positions, None)[0], target))
    return pairs


def _real(tensor, attention_mask):
    return tensor if attention_mask is None else tensor[attention_mask.to(torch.bool)]


class AttentionTransfer(nn.Module):
    """Attention transfer as a model the shared training loop can train (its checkpoints and exact resume come with
    it): ``forward(input_ids, attention_mask, labels)`` returns the mean over layers of the mean squared error between
    each linear layer's output and the softmax layer's, on real tokens. Only the student's feature maps and window
    mixes train; the teacher and every other weight are frozen."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        trainable = {id(p) for p in transfer_parameters(student)}
        for parameter in student.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
        if not trainable:
            raise ValueError("attention transfer: the student has no feature-map parameters (linearize it with a "
                             "learned feature map: hedgehog or t2r)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's dropout never runs
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        pairs = layer_outputs(self.student, self.teacher, input_ids, attention_mask)
        losses = [nn.functional.mse_loss(_real(out, attention_mask), _real(target, attention_mask))
                  for out, target in pairs]
        return ModelOutput(loss=torch.stack(losses).mean())


def attention_transfer(student, teacher, batches: Iterable[dict], steps: int, lr: float = 1e-2) -> list[float]:
    """The plain loop of attention transfer (the recipe runs the same objective in the shared loop): ``steps`` AdamW
    steps over ``batches`` (cycled; dicts with input_ids and optionally attention_mask). Returns the losses."""
    objective = AttentionTransfer(student, teacher).train()
    optimizer = torch.optim.AdamW(transfer_parameters(student), lr=lr, weight_decay=0.0)
    batches, losses = list(batches), []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = objective(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def attention_errors(student, teacher, batches: Iterable[dict]) -> list[float]:
    """Each layer's relative attention-output error ‖ŷ − y‖ / ‖y‖ over real tokens of ``batches`` (y the softmax
    layer's output, ŷ the linear layer's on the same input)."""
    squared, norms = None, None
    for batch in batches:
        mask = batch.get("attention_mask")
        pairs = layer_outputs(student, teacher, batch["input_ids"], mask)
        errors = [float((_real(o, mask) - _real(t, mask)).square().sum()) for o, t in pairs]
        sizes = [float(_real(t, mask).square().sum()) for _, t in pairs]
        squared = errors if squared is None else [a + b for a, b in zip(squared, errors)]
        norms = sizes if norms is None else [a + b for a, b in zip(norms, sizes)]
    return [(e / n) ** 0.5 for e, n in zip(squared, norms)]


__all__ = ["AttentionTransfer", "attention_errors", "attention_transfer", "linearize", "transfer_parameters"]
