"""Data-parallel training (2 CPU processes, gloo) keeps single-process semantics: one optimizer step per global
batch, one EMA update per optimizer step, identical weights on every rank, distinct samples and noise per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import make_cfg
from difflab.cli.train import run

ROOT = Path(__file__).resolve().parent.parent
STEPS, PER_DEVICE = 4, 8
COMMON = ["data=digits", "network=tiny", f"trainer.max_steps={STEPS}", "trainer.max_time=null",
          "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false",
          "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=100000",
          "model.ema_decay=0.9", "+callbacks.probe._target_=ddp_probe.Probe"]


def ema_from_trajectory(initial, params, decay):
    """EMA with diffusers' warm-up, one update per optimizer step: d_n = min(decay, (1 + n) / (10 + n))."""
    ema = initial.double()
    for n, theta in enumerate(params):
        d = min(decay, (1 + n) / (10 + n))
        ema = d * ema + (1 - d) * theta.double()
    return ema


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_semantics(tmp_path):
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "DIFFLAB_RUN_DIR": str(ddp_dir), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu",
                             "trainer.devices=2", f"data.batch_size={PER_DEVICE}", *COMMON,
                             f"+callbacks.probe.out={ddp_dir / 'probe'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ranks = [torch.load(ddp_dir / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # the same run in one process with the same global batch
    single_dir = tmp_path / "single"
    run(make_cfg(single_dir, f"data.batch_size={2 * PER_DEVICE}", *COMMON[2:],
                 f"+callbacks.probe.out={single_dir / 'probe'}"))
    single = torch.load(single_dir / "probe" / "rank0.pt", weights_only=False)

    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    # optimizer steps, EMA updates and the learning-rate schedule count global batches, as in one process
    for record in (*ranks, single):
        assert record["global_step"] == record["ema_updates"] == STEPS
        assert len(record["indices"]) == len(record["params"]) == STEPS
    assert ranks[0]["lr"] == ranks[1]["lr"] == single["lr"]
    # each step: 2 x 8 distinct samples, as many as the single process's batch of 16
    for step in range(STEPS):
        a, b = ranks[0]["indices"][step], ranks[1]["indices"][step]
        assert len(a) == len(b) == PER_DEVICE and not set(a.tolist()) & set(b.tolist())
        assert len(single["indices"][step]) == 2 * PER_DEVICE
    # gradients are averaged: both ranks hold the same weights after every step, and the same EMA
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[0]["final_ema"], ranks[1]["final_ema"], rtol=0, atol=1e-6)
    # the EMA is the warm-up average of the optimizer-step trajectory: one update per global step, on each rank
    for record in ranks:
        expected = ema_from_trajectory(record["initial_ema"], record["params"], record["ema_decay"])
        torch.testing.assert_close(record["final_ema"].double(), expected, rtol=0, atol=1e-5)
    # each rank draws its own timesteps (seed_everything alone would give both ranks the same)
    assert any(not torch.equal(t0, t1) for t0, t1 in zip(ranks[0]["timesteps"], ranks[1]["timesteps"], strict=True))
    # rank 0 wrote one checkpoint, holding the ranks' weights, EMA and step
    checkpoint = torch.load(ddp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    state = checkpoint["state_dict"]
    network = torch.cat([state[f"model.network.{name}"].flatten() for name in ranks[0]["names"]])
    ema = torch.cat([state[f"ema.{name}"].flatten() for name in ranks[0]["names"]])
    torch.testing.assert_close(network, ranks[0]["final_params"])
    torch.testing.assert_close(ema, ranks[0]["final_ema"])
    assert int(state["ema_updates"]) == STEPS
    assert (ddp_dir / "metrics.json").is_file() and not list(ddp_dir.rglob("rank1*.ckpt"))
