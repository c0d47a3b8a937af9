"""``trainer=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ModelParallelStrategy, every
rank one data-parallel shard. The trained network and its EMA copy are sharded the same way, block by block, so each
rank updates the EMA of its own shard of the weights; frozen parts (text encoder, first stage) stay whole."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from difflab.errors import UsageError


def block_types() -> tuple[type, ...]:
    """The blocks each sharded on their own (their weights gathered only while they run)."""
    from difflab.nn.attention import SelfAttentionBlock, TransformerBlock
    from difflab.nn.dit import DiTBlock
    from difflab.nn.unet import ResBlock

    return ResBlock, SelfAttentionBlock, TransformerBlock, DiTBlock


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain fully sharded data parallelism: all ranks in one data-parallel
    dimension, none tensor-parallel. ``sharded_checkpoints=False`` (the default) writes one ``.ckpt`` gathered on rank
    zero, which sample.py, evaluate.py and export read on one device; ``True`` writes a folder of shards per
    checkpoint (faster for large models; resumable, but difflab's readers take single files only)."""

    def __init__(self, sharded_checkpoints: bool = False, **kwargs):
        super().__init__(save_distributed_checkpoint=sharded_checkpoints, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard(module: nn.Module, mesh) -> None:
    """``fully_shard`` the blocks, then the whole, of ``module.network`` and of ``module.ema``: identical modules
    sharded identically, so their local shards correspond element by element."""
    from torch.distributed.fsdp import fully_shard

    if getattr(module, "finetune", None) is not None:
        raise UsageError("trainer=fsdp with finetune=lora is not supported: LoRA trains a few adapters, use "
                         "trainer=ddp")
    mesh = mesh["data_parallel"]
    blocks = block_types()
    for network in (module.network, module.ema):
        for child in network.modules():
            if isinstance(child, blocks):
                fully_shard(child, mesh=mesh)
        fully_shard(network, mesh=mesh)
