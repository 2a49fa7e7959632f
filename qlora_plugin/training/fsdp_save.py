"""The final adapter under FSDP, whatever the state dict type the accelerate config names.

Why: transformers' `Trainer.save_model` writes under FSDP only when the state dict type is `FULL_STATE_DICT`
(transformers 5.24, trainer.py:4105-4108). With the `SHARDED_STATE_DICT` of examples/accelerate/fsdp_qlora.yaml
(right for checkpoints: each rank writes its own shard, and resume reads them back) the output folder got no
`adapter_model.safetensors`, and `qlora-plugin merge` needs it. Its `FULL_STATE_DICT` path gathers through
accelerate's `get_state_dict`, which always offloads to the CPU (accelerate/accelerator.py:4101-4106); with one
process FSDP runs `NO_SHARD` and refuses that ("offload_to_cpu=True and NO_SHARD is not supported yet",
torch/distributed/fsdp/_unshard_param_utils.py:141).

So the final save (`Trainer.save_model` outside a checkpoint) gathers the full state dict once, on rank 0, on its
CPU when there are several processes (as accelerate's `save_fsdp_model` does, fsdp_utils.py), and writes it with
the Trainer's own `_save`, where peft's `save_pretrained` keeps only the adapter. This is what peft's FSDP example
does by switching to `FULL_STATE_DICT` before its final `save_model`. Checkpoints keep the configured type.
"""

from __future__ import annotations

from qlora_plugin.ecosystem.compat import trainer_save


def full_state_dict(trainer) -> dict:
    """The FSDP model's full state dict: on rank 0 only (CPU) with several processes, in place with one."""
    plugin = trainer.accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) == 2:
        return trainer.accelerator.get_state_dict(trainer.model)  # FSDP2: full, from rank 0, on the CPU
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    several = trainer.accelerator.num_processes > 1
    config = FullStateDictConfig(offload_to_cpu=several, rank0_only=several)
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        return trainer.model.state_dict()


def save_fsdp_adapter(trainer, output_dir: str) -> None:
    """Every rank calls this (the gather is collective); rank 0 writes the adapter, config and tokenizer."""
    trainer_save(trainer, output_dir, full_state_dict(trainer))
