"""difflab.train / difflab.compose: the command line's job from Python."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import difflab

SMALL = ["data=digits", "network=tiny", "data.batch_size=16", "trainer.log_every_n_steps=1", "trainer.max_time=null",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_samples=4",
         "callbacks.checkpoint.every_n_train_steps=2"]


def test_train_from_python_writes_the_run_and_resumes(tmp_path):
    run = difflab.train(*SMALL, run_dir=tmp_path / "run", progress=False)
    assert run.dir == (tmp_path / "run").resolve()
    assert run.last_checkpoint.is_file() and (run.dir / "samples" / "step_000004.png").is_file()
    saved = OmegaConf.load(run.dir / "config.yaml")
    assert saved.network.model_channels == difflab.compose("network=tiny").network.model_channels
    assert saved.paths.output_dir == str(run.dir) and run.trainer.global_step == 4
    assert [step for step, _ in run.metrics()["train/loss"]][-1] == 3  # steps 0..3 logged by the CSV logger
    images = run.pipeline()(n=2, label=3, steps=3, seed=0, progress=False)
    loaded = difflab.load(run.last_checkpoint, device="cpu")(n=2, label=3, steps=3, seed=0, progress=False)
    torch.testing.assert_close(images, loaded)  # the returned module is the checkpoint's
    again = difflab.train(*SMALL, "trainer.max_steps=6", run_dir=tmp_path / "run", progress=False)
    assert again.trainer.global_step == 6  # ckpt_path=auto: continued from step 4


def test_compose_refuses_an_unknown_option():
    with pytest.raises(Exception, match="schedule"):
        difflab.compose("schedule=nope")
