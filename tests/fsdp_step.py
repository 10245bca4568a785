"""One FSDP training step per attention family, on the processes `accelerate launch` started (gloo on CPU); run by
tests/test_fsdp.py, which checks what this writes under the output folder given as the only argument.

For every family in the registry: a decoder with tied embeddings and ALBERT sharing (2 distinct blocks, each applied
twice). Every rank builds the same plain model (the reference) and takes one SGD step on the whole global batch; the
FSDP model is built on the meta device, sharded with FSDP2 (`fully_shard` on each block, then the root, as Accelerate's
`transformer_based_wrap` does), materialised with `to_empty` + `init_weights` (which must rebuild the unsaved buffers)
and loaded with the reference's full state dict; it takes the same step on this rank's half of the batch. Written per
family: the losses, the gathered gradients and updated weights of both, a sharded checkpoint (torch's DCP format, which
Accelerate's `merge_fsdp_weights` merges), a full state dict saved with `save_pretrained`, and the FSDP model's logits.

Accelerate 1.16 has no FSDP on CPU: with `ACCELERATE_USE_CPU=1` its state stays MULTI_CPU and an `fsdp_plugin` is
dropped (the model is wrapped in DistributedDataParallel). So this script lets Accelerate start the process group and
calls torch's `fully_shard` itself; it records the distributed type Accelerate chose for the test to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from hf_xarch import ATTENTION_FAMILIES, XArchForCausalLM
from tests.helpers import FAMILY_OVERRIDES, random_ids, tiny_config

LEARNING_RATE = 0.5  # large, so that a wrong gradient moves the weights visibly


def fsdp_config(family: str):
    """Tied embeddings, 4 layers over 2 distinct blocks (ALBERT: one group of 2 inner blocks, each applied twice), and
    RoPE, whose unsaved inv_freq buffer the meta-device build must rebuild (every family takes it)."""
    options = FAMILY_OVERRIDES.get(family, {})  # windows and blocks shorter than the 16-token rows
    return tiny_config(attention_type=family, is_decoder=True, tie_word_embeddings=True, num_hidden_layers=4,
                       num_hidden_groups=1, inner_group_num=2, position_embedding_type="rope", **options)


def sharded_from_meta(config, weights: dict[str, torch.Tensor]) -> XArchForCausalLM:
    with torch.device("meta"):
        model = XArchForCausalLM(config)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    model.init_weights()  # rebuilds what no state dict holds (rotary inv_freq, ALiBi slopes) and re-ties lm_head
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def one_step(model, ids: torch.Tensor) -> tuple[float, dict, dict]:
    """Loss, gathered gradients and gathered weights after one SGD step on `ids` (this rank's rows)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: full(p.grad) for name, p in model.named_parameters()}
    optimizer.step()
    return float(loss), grads, {name: full(p) for name, p in model.named_parameters()}


def run_family(family: str, folder: Path, rank: int, world: int) -> dict:
    config = fsdp_config(family)
    torch.manual_seed(0)
    reference = XArchForCausalLM(config)
    start = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    batch = random_ids(4, 16, seed=1)
    probe = random_ids(2, 16, seed=2)

    model = sharded_from_meta(config, start)
    assert model.lm_head.weight is model.model.embeddings.word_embeddings.weight, "FSDP untied the embeddings"
    # each rank holds only its shards (the root's parameters stay gathered after a forward, so count them now)
    held = sum(p.to_local().numel() for p in model.parameters())
    rows = batch.shape[0] // world
    fsdp_loss, fsdp_grads, fsdp_weights = one_step(model, batch[rank * rows : (rank + 1) * rows])
    mean_loss = torch.tensor(fsdp_loss)
    dist.all_reduce(mean_loss)  # every rank's rows hold the same number of tokens: the mean of means is the mean
    reference_loss, reference_grads, reference_weights = one_step(reference, batch)

    out = folder / family
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "sharded"))
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with torch.no_grad():
        logits = model.eval()(probe).logits
    if rank == 0:
        XArchForCausalLM(config).save_pretrained(out / "full", state_dict=full_state)
        for name, tensors in [("fsdp_grads", fsdp_grads), ("fsdp_weights", fsdp_weights),
                              ("reference_grads", reference_grads), ("reference_weights", reference_weights),
                              ("logits", {"logits": logits, "probe": probe})]:
            save_file(tensors, str(out / f"{name}.safetensors"))
    return {"fsdp_loss": mean_loss.item() / world, "reference_loss": reference_loss, "elements_held": held,
            "elements": sum(p.numel() for p in reference.parameters())}


def main(folder: Path) -> None:
    accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    results = {"accelerate_distributed_type": str(accelerator.distributed_type), "world_size": accelerator.num_processes}
    for family in (name for name, record in ATTENTION_FAMILIES.items() if record.causal):  # causal LMs
        results[family] = run_family(family, folder, accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        (folder / "results.json").write_text(json.dumps(results, indent=1))
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
