"""One process per device for what runs after training (sample.py, evaluate.py, the NFE sweep): ``devices=N``
starts them as training's DDP does, through Lightning's launcher; under torchrun or srun each process is already one
rank and joins the others. Work is then split with ``difflab.all_ranks.share`` and gathered back."""

from __future__ import annotations

import torch

from difflab.errors import UsageError
from difflab.loading import resolve_device


def start(device: str = "auto", devices: int = 1, num_nodes: int = 1) -> torch.device:
    """This process's device. With ``devices`` x ``num_nodes`` > 1 the other processes are launched (unless a
    cluster launcher started them) and the process group is joined: NCCL on GPUs, gloo on CPUs."""
    if int(devices) < 1 or int(num_nodes) < 1:
        raise UsageError(f"devices={devices} num_nodes={num_nodes}: each must be at least 1")
    if int(devices) * int(num_nodes) == 1:
        return resolve_device(device)
    accelerators = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}
    if str(device) not in accelerators:
        raise UsageError(f"device={device} with devices={devices}: give device=auto, cuda or cpu (one process per "
                         "device; mps runs one process only)")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerators[str(device)], devices=int(devices), num_nodes=int(num_nodes),
                    strategy="ddp")
    fabric.launch()  # the other local ranks re-run this command (under Hydra: in the same run directory)
    return fabric.device
