"""Post-hoc EMA (EDM2 section 3): power-function profiles, their snapshots, and the reconstruction of another
length, checked against closed forms and against a profile tracked directly in the same run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs import make_cfg
from difflab.cli.train import run
from difflab.ema import beta, combination, gamma_of, reconstruct, sigma_rel_of
from difflab.ema.power import profile_inner_product
from difflab.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 60, 5


def test_sigma_rel_and_gamma_are_edm2s():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.07, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-10)
    with pytest.raises(ValueError, match="sigma_rel=0.3 must lie in"):
        gamma_of(0.3)


def test_the_update_gives_each_step_its_profile_mass():
    """The EMA of one-hot weights e_1..e_T under beta(gamma, t) is its profile: step k weighs
    (k^(gamma+1) - (k-1)^(gamma+1)) / T^(gamma+1), the mass of (gamma+1) u^gamma / T^(gamma+1) on (k-1, k]."""
    T, gamma = 40, gamma_of(0.1)
    ema = np.zeros(T)
    for t in range(1, T + 1):
        ema = beta(gamma, t) * ema + (1 - beta(gamma, t)) * np.eye(T)[t - 1]
    k = np.arange(1, T + 1, dtype=np.float64)
    np.testing.assert_allclose(ema, (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / T ** (gamma + 1), rtol=1e-12)


@pytest.mark.parametrize("t_a,t_b", [(30.0, 70.0), (70.0, 30.0), (50.0, 50.0)])
def test_profile_inner_product_is_the_integral(t_a, t_b):
    ga, gb = gamma_of(0.05), gamma_of(0.1)
    u = np.linspace(0, min(t_a, t_b), 2_000_001)  # the product is 0 beyond the shorter profile
    p = lambda t, g: (g + 1) * u ** g / t ** (g + 1)  # noqa: E731
    numeric = np.trapezoid(p(t_a, ga) * p(t_b, gb), u)
    assert profile_inner_product(t_a, ga, t_b, gb) == pytest.approx(numeric, rel=1e-8)


def test_weights_sum_to_one_and_a_snapshot_asked_for_is_itself():
    steps = [10, 20, 30, 10, 20, 30]
    gammas = [gamma_of(0.05)] * 3 + [gamma_of(0.1)] * 3
    x = combination(steps, gammas, 25, gamma_of(0.07))
    assert x.sum() == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(combination(steps, gammas, 20, gamma_of(0.1)), np.eye(6)[4], atol=1e-7)


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
    """A run tracking sigma_rel 0.05 and 0.10 (ema=posthoc) and, in a second callback, 0.07 directly."""
    tmp = tmp_path_factory.mktemp("posthoc")
    run(make_cfg(tmp, "ema=posthoc", f"ema.snapshot_every={EVERY}", f"trainer.max_steps={STEPS}", "conditioning=none",
                 "callbacks.sample_grid.every_n_steps=0", f"callbacks.checkpoint.every_n_train_steps={STEPS}",
                 "trainer.val_check_interval=1000", "trainer.max_time=null",
                 "+callbacks.direct._target_=difflab.lightning.posthoc_ema.PostHocEMA",
                 "+callbacks.direct.sigma_rels=[0.07]", f"+callbacks.direct.snapshot_every={STEPS}",
                 f"+callbacks.direct.dirpath={tmp / 'direct'}"))
    return tmp


def profile(path: Path, k: int) -> dict[str, torch.Tensor]:
    return {key.split(".", 1)[1]: v for key, v in load_file(str(path)).items() if key.startswith(f"profile{k}.")}


def distance(a: dict, b: dict) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b).sqrt())


def test_reconstruction_matches_the_profile_tracked_directly(posthoc_run):
    snapshots = sorted((posthoc_run / "posthoc_ema").glob("step_*.safetensors"))
    assert [int(p.stem.split("_")[1]) for p in snapshots] == list(range(EVERY, STEPS + 1, EVERY))
    direct = profile(posthoc_run / "direct" / f"step_{STEPS:09d}.safetensors", 0)
    found = reconstruct(posthoc_run / "posthoc_ema", 0.07)
    assert found.step == STEPS and found.snapshots == STEPS // EVERY and found.fit_error < 0.01
    nearest = min(distance(profile(snapshots[-1], k), direct) for k in (0, 1))  # the tracked lengths themselves
    assert distance(found.weights, direct) < 0.02 * nearest
    assert distance(found.weights, direct) < 1e-5 * distance(direct, {k: 0 * v for k, v in direct.items()})


def test_the_cli_writes_a_checkpoint_that_samples(posthoc_run, tmp_path):
    from difflab.loading import load_model

    done = subprocess.run([sys.executable, "-m", "difflab.ema", "reconstruct", str(posthoc_run),
                           "sigma_rel=[0.07,0.2]"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 2
    path = posthoc_run / "checkpoints" / f"posthoc_sigma0.070_step{STEPS}.ckpt"
    model = load_model(path)
    found = reconstruct(posthoc_run / "posthoc_ema", 0.07)
    for name, value in model.network.state_dict().items():
        torch.testing.assert_close(value, found.weights[name], atol=0, rtol=0, msg=name)
    assert model.pipeline()(2, seed=0, steps=2, progress=False).shape == (2, 1, 8, 8)
    bad = subprocess.run([sys.executable, "-m", "difflab.ema", "reconstruct", str(posthoc_run), "sigma_rel=0.07",
                          f"step={STEPS + 1}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert f"step={STEPS + 1}: the snapshots in" in bad.stderr and f"cover steps {EVERY}..{STEPS}" in bad.stderr


def test_a_snapshot_of_other_sizes_is_refused_from_its_header(posthoc_run, tmp_path):
    from difflab.ema.checkpoint import write_reconstructed
    from difflab.ema.snapshots import write_snapshot

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes((posthoc_run / "checkpoints" / "last.ckpt").read_bytes())
    name = next(iter(profile(posthoc_run / "direct" / f"step_{STEPS:09d}.safetensors", 0)))
    write_snapshot(run_dir / "posthoc_ema", 5, [gamma_of(0.05)], [{name: torch.zeros(4096, 4096)}], {})
    with pytest.raises(UsageError, match=f"{name} has shape \\(4096, 4096\\), the run's network"):
        write_reconstructed(run_dir, 0.07)


def test_a_bad_snapshot_file_is_named(posthoc_run, tmp_path):
    folder = tmp_path / "posthoc_ema"
    folder.mkdir()
    (folder / "step_000000005.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="step_000000005.safetensors is not a difflab post-hoc EMA snapshot"):
        reconstruct(folder, 0.07)


def test_resume_continues_the_profiles_and_refuses_other_lengths(tmp_path):
    quiet = ["ema=posthoc", "ema.snapshot_every=5", "conditioning=none", "callbacks.sample_grid.every_n_steps=0",
             "trainer.val_check_interval=1000", "trainer.max_time=null", "callbacks.checkpoint.every_n_train_steps=10"]
    run(make_cfg(tmp_path, "trainer.max_steps=10", *quiet))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("PostHocEMA"))
    assert saved["updates"] == 10
    at_10 = profile(tmp_path / "posthoc_ema" / "step_000000010.safetensors", 1)
    for name, value in at_10.items():  # the checkpoint holds the profiles as of its step
        torch.testing.assert_close(saved["profiles"][f"profile1.{name}"], value, atol=0, rtol=0)
    trainer = run(make_cfg(tmp_path, "trainer.max_steps=20", *quiet))  # ckpt_path=auto: resumes
    callback = next(c for c in trainer.callbacks if type(c).__name__ == "PostHocEMA")
    assert callback.updates == 20 and (tmp_path / "posthoc_ema" / "step_000000020.safetensors").is_file()
    after = profile(tmp_path / "posthoc_ema" / "step_000000020.safetensors", 1)
    assert 0 < distance(after, at_10)  # continued, from the restored profile (a fresh one would equal the weights)
    with pytest.raises(UsageError, match="resume with the same ema.sigma_rels"):
        run(make_cfg(tmp_path, "trainer.max_steps=30", "ema.sigma_rels=[0.05,0.2]", *quiet))
