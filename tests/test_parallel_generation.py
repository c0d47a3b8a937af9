"""Generation and evaluation on several devices (two CPU processes, gloo, started by ``devices=2`` as on GPUs):
each process makes its share of the samples by seed, and the results are those of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import compose_config, make_cfg, sample_cfg
from difflab.all_ranks import share
from difflab.cli.evaluate import evaluate
from difflab.cli.sample import sample
from difflab.cli.train import run

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 300


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shares_are_contiguous_balanced_and_cover_every_item(world):
    for n in range(world, 40):
        blocks = [share(n, world, r) for r in range(world)]
        assert [k for block in blocks for k in block] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1 and min(map(len, blocks)) >= 1


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run(make_cfg(tmp, "trainer.max_steps=2", "sampler.num_steps=2"))  # the default: class-conditional
    return tmp / "checkpoints" / "last.ckpt"


def two_processes(tmp_path: Path, script: str, *overrides: str) -> str:
    """``python <script> ... devices=2 device=cpu``, as a user runs it; its output (AssertionError with it if it
    fails)."""
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env["HOME"] = str(tmp_path)  # Lightning picks a free port for the processes it starts
    done = subprocess.run([sys.executable, str(ROOT / script), "devices=2", "device=cpu", "progress=false",
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_sample_on_two_devices_writes_the_samples_of_one(class_checkpoint, tmp_path):
    """n=63 on 2 processes: 31 + 32 samples of each label, named and seeded as one process names and seeds them,
    in batches that differ from one process's; one grid."""
    common = [f"ckpt={class_checkpoint}", "n=63", "label=[1,7]", "steps=2", "seed=3", "batch_size=16"]
    one = sample(sample_cfg(*common, f"out={tmp_path / 'one'}", "progress=false"))
    output = two_processes(tmp_path, "sample.py", *common, f"out={tmp_path / 'two'}")
    assert output.count("wrote 126 samples") == 1  # one process reports
    names = sorted(p.name for p in one.glob("*_seed*.png"))
    assert len(names) == 126 and names == sorted(p.name for p in (tmp_path / "two").glob("*_seed*.png"))
    for name in [*names, "grid.png"]:  # batches of other sizes: float rounding may move a pixel by one level
        assert np.abs(pixels(one / name) - pixels(tmp_path / "two" / name)).max() <= 1, name
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["processes"] == 2


def test_evaluate_on_two_devices_gives_the_figures_of_one(class_checkpoint, tmp_path):
    common = [f"ckpt={class_checkpoint}", "n=201", "steps=2", "batch_size=64", "bootstrap=20"]
    one = evaluate(compose_config("evaluate", *common, "progress=false"))
    output = two_processes(tmp_path, "evaluate.py", *common, f"out={tmp_path / 'two.json'}")
    assert output.count("wrote ") == 1
    two = json.loads((tmp_path / "two.json").read_text())
    for key in ("fid", "kid", "precision", "recall", "inception_score", "fid_real_vs_real", "kid_real_vs_real"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert two["n"] == one["n"] == 201


def test_fewer_samples_than_devices_is_refused_in_one_line(class_checkpoint, tmp_path):
    with pytest.raises(AssertionError, match="n=1 samples on 2 processes: give n at least the number of devices"):
        two_processes(tmp_path, "sample.py", f"ckpt={class_checkpoint}", "n=1", "steps=2")


def test_srun_started_processes_join_and_share_like_devices(class_checkpoint, tmp_path):
    """slurm/evaluate.sbatch's line, acted out: two processes started as srun starts them (SLURM variables, one per
    rank) join each other instead of launching more, and give one process's figures."""
    import random
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SLURM_JOB_ID": str(random.randint(1000, 9999)), "SLURM_JOB_NAME": "difflab-eval",
           "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HOME": str(tmp_path)}
    common = [f"ckpt={class_checkpoint}", "n=21", "steps=2", "batch_size=8", "bootstrap=0", "metrics=[fid]"]
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), "device=cpu", "devices=2", "num_nodes=1",
                               "progress=false", *common, f"out={tmp_path / 'srun.json'}"], cwd=tmp_path,
                              env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = []
    for process in ranks:
        try:
            outputs.append(process.communicate(timeout=LIMIT_S)[0])
        except subprocess.TimeoutExpired:
            process.kill()
            outputs.append(process.communicate()[0])
        assert process.returncode == 0, outputs[-1][-3000:]
    assert sum(output.count("wrote ") for output in outputs) == 1
    one = evaluate(compose_config("evaluate", *common, "progress=false"))
    assert json.loads((tmp_path / "srun.json").read_text())["fid"] == pytest.approx(one["fid"], rel=1e-4)
