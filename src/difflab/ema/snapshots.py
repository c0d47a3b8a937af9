"""Post-hoc EMA snapshot files and the reconstruction of any EMA length from them (EDM2, section 3.1).

A snapshot is one safetensors file, ``step_<t>.safetensors``: every tracked profile's average of the network's
parameters at step t (``profile<k>.<name>``), the network's buffers (``buffer.<name>``), and metadata naming the
step and the profiles' exponents. Files are read as tensors and checked values only: never unpickled."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from difflab.ema.power import combination, fit_error, gamma_of
from difflab.errors import MissingFileError, UsageError
from difflab.files import atomic_write

FORMAT = "difflab-posthoc-ema-1"
NAME = re.compile(r"step_(\d{1,12})\.safetensors")
MAX_SNAPSHOTS = 100_000  # a folder holding more is not a run's


def write_snapshot(folder: Path, step: int, gammas: list[float], profiles: list[dict[str, Tensor]],
                   buffers: dict[str, Tensor]) -> Path:
    """``folder/step_<step>.safetensors``, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"profile{k}.{name}": value.detach().contiguous().cpu()
               for k, profile in enumerate(profiles) for name, value in profile.items()}
    tensors.update({f"buffer.{name}": value.detach().contiguous().cpu() for name, value in buffers.items()})
    path = Path(folder) / f"step_{step:09d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "step": str(step), "gammas": json.dumps(gammas)})
    return path


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    gammas: tuple[float, ...]


def snapshots(folder: Path) -> list[Snapshot]:
    """The snapshots of a folder in step order, each one's header checked (a bad file: an error naming it)."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"no post-hoc EMA snapshots: {folder} is not a folder (train with ema=posthoc)")
    paths = sorted(p for p in folder.iterdir() if NAME.fullmatch(p.name) and p.is_file())
    if not paths:
        raise MissingFileError(f"no post-hoc EMA snapshots (step_*.safetensors) in {folder} (train with ema=posthoc)")
    if len(paths) > MAX_SNAPSHOTS:
        raise UsageError(f"{folder} holds {len(paths)} snapshots, more than {MAX_SNAPSHOTS}: not a run's folder")
    found = []
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
            step, gammas = int(meta["step"]), json.loads(meta["gammas"])
            if meta.get("format") != FORMAT or step < 1 or not isinstance(gammas, list) or not gammas or not all(
                    isinstance(g, (int, float)) and 0 <= g < 1e6 for g in gammas):
                raise ValueError("unexpected metadata")
            if {key.split(".", 1)[0] for key in keys} - {"buffer"} != {f"profile{k}" for k in range(len(gammas))}:
                raise ValueError("its tensors do not match its profiles")
        except Exception as err:  # not safetensors, no or bad metadata
            raise UsageError(f"{path} is not a difflab post-hoc EMA snapshot ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from err
        found.append(Snapshot(path, step, tuple(float(g) for g in gammas)))
    return sorted(found, key=lambda s: s.step)


@dataclass
class Reconstruction:
    """The reconstructed EMA's tensors by the network's names, and how well its profile matches the target's."""

    weights: dict[str, Tensor]
    sigma_rel: float
    step: int
    fit_error: float  # L2 distance of the combined profile from the target, relative to the target's norm
    snapshots: int


def reconstruct(folder: Path, sigma_rel: float, step: int | None = None,
                expected: dict[str, tuple[int, ...]] | None = None) -> Reconstruction:
    """The EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot's) as the least-squares combination
    of the folder's snapshots up to ``step``, summed in float64 one file at a time. ``expected``: the network's
    parameter shapes, checked in each file's header before a tensor is read (a file of other sizes reads nothing)."""
    from safetensors import safe_open

    try:
        target_gamma = gamma_of(float(sigma_rel))
    except ValueError as err:
        raise UsageError(str(err)) from err
    found = snapshots(folder)
    step = found[-1].step if step is None else int(step)
    used = [s for s in found if s.step <= step]
    if not used or step > found[-1].step:
        raise UsageError(f"step={step}: the snapshots in {folder} cover steps {found[0].step}..{found[-1].step}")
    steps = [s.step for s in used for _ in s.gammas]
    gammas = [g for s in used for g in s.gammas]
    weights = combination(steps, gammas, step, target_gamma)
    total: dict[str, Tensor] = {}
    shapes: dict[str, tuple] = {}
    i = 0
    for snapshot in used:
        with safe_open(str(snapshot.path), framework="pt") as f:
            names = {key.split(".", 1)[1] for key in f.keys() if key.startswith("profile0.")}
            if shapes and names != set(shapes):
                raise UsageError(f"{snapshot.path} holds other parameters than {used[0].path}: snapshots of two runs")
            if expected is not None and not names <= set(expected):
                raise UsageError(f"{snapshot.path} holds other parameters than the run's network")
            for k in range(len(snapshot.gammas)):
                for name in names:
                    shape = tuple(f.get_slice(f"profile{k}.{name}").get_shape())
                    if expected is not None and shape != tuple(expected[name]):
                        raise UsageError(f"{snapshot.path}: {name} has shape {shape}, the run's network "
                                         f"{tuple(expected[name])}")
                    value = f.get_tensor(f"profile{k}.{name}")
                    if shapes.setdefault(name, tuple(value.shape)) != tuple(value.shape):
                        raise UsageError(f"{snapshot.path}: {name} has shape {tuple(value.shape)}, "
                                         f"{shapes[name]} elsewhere")
                    term = value.double() * float(weights[i])
                    total[name] = term if name not in total else total[name].add_(term)
                i += 1
            if snapshot is used[-1]:  # buffers (e.g. running statistics) as of the last snapshot used
                buffers = {key.removeprefix("buffer."): f.get_tensor(key) for key in f.keys()
                           if key.startswith("buffer.")}
    out = {name: value.float() for name, value in total.items()}  # profiles are float32; cast on writing
    out.update(buffers)
    return Reconstruction(out, float(sigma_rel), step, fit_error(steps, gammas, weights, step, target_gamma),
                          len(used))

