"""Generation outside training (after diffusers' pipelines): what a user holds after training.

    pipe = difflab.load("outputs/.../last.ckpt")                  # EMA weights
    images = pipe(n=16, label=7, guidance_scale=3, sampler="dpmpp_2m", steps=20, seed=0)   # (16, C, H, W) in [0, 1]
    images = pipe(init_image=img, strength=0.6, label=8)          # SDEdit; mask=... inpaints
    x_T = pipe.invert(img, label=3); pipe(noise=x_T, label=8)     # DDIM inversion, then an edit

Batching, seeding and devices live here once; sample.py, evaluate.py, the callbacks and bench/ call it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from difflab.conditioning.base import ClassConditioner, Condition, MultiConditioner, NoConditioning
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.editing import noise_to_start, repaint, strength_start_index
from difflab.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance, Conditioned
from difflab.diffusion.noise import randn
from difflab.diffusion.samplers import Sampler, get_sampler, require_invertible
from difflab.errors import UsageError
from difflab.files import atomic_write
from difflab.model import DiffusionModel

ImageInput = Tensor | str | Path


class Pipeline:
    """Generation from a ``DiffusionModel``: its network with the schedule, parameterisation, conditioner, default
    sampler and guidance (and, for latent models, the first stage that maps images to the diffusion space and back).

    Images in and out are (N, C, H, W) in [0, 1] on the pipeline's device. Every sample has its own generator
    (seed + its index, on the CPU), so a seed gives the same sample whatever the batch size or device.
    """

    def __init__(self, model: DiffusionModel):
        self.model = model

    # the model's parts, as the samplers, probes and callers read them
    network = property(lambda self: self.model.network)
    schedule = property(lambda self: self.model.schedule)
    prediction = property(lambda self: self.model.prediction)
    sampler = property(lambda self: self.model.sampler)
    conditioner = property(lambda self: self.model.conditioner)
    guidance_scale = property(lambda self: self.model.guidance_scale)
    image_shape = property(lambda self: self.model.image_shape)
    pixel_shape = property(lambda self: self.model.pixel_shape)
    first_stage = property(lambda self: self.model.first_stage)

    # ---- devices and modes ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: torch.device | str) -> Pipeline:
        self.model.to(device)
        return self

    @contextmanager
    def _eval(self):
        """The model in eval mode and without gradients for the duration, its mode restored afterwards."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes.items():
                m.training = mode

    # ---- the diffusion space ------------------------------------------------------------------------

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the diffusion space."""
        if tuple(images.shape[1:]) != self.pixel_shape:
            raise UsageError(f"images of shape {tuple(images.shape[1:])}, the model takes {self.pixel_shape}")
        return images if self.first_stage is None else self.first_stage.encode(images)

    def decode(self, x: Tensor) -> Tensor:
        """The diffusion space -> images in [-1, 1]."""
        return (x if self.first_stage is None else self.first_stage.decode(x)).clamp(-1, 1)

    def _latent_mask(self, mask: Tensor) -> Tensor:
        """A latent is regenerated if any pixel it covers is (max-pooling the pixel mask by the downsampling)."""
        f = getattr(self.first_stage, "downsampling_factor", 1)
        return F.max_pool2d(mask, f) if f > 1 else mask

    # ---- requests -------------------------------------------------------------------------------------

    def resolve_sampler(self, sampler: Sampler | str | None = None, steps: int | None = None) -> Sampler:
        """The pipeline's sampler, one of ``conf/sampler`` by name, or the one given; with ``steps`` steps."""
        sampler = self.sampler if sampler is None else get_sampler(sampler) if isinstance(sampler, str) else sampler
        return sampler if steps is None else sampler.with_steps(steps)

    def resolve_guidance(self, guidance_scale: float | None = None) -> float:
        """The classifier-free guidance scale a call uses: the one asked for, else the model's default."""
        return self.guidance_scale if guidance_scale is None else float(guidance_scale)

    @staticmethod
    def resolve_strength(strength: float | None, inpainting: bool) -> float:
        """The editing strength a call uses: the one asked for, else diffusers' defaults (inpainting 1.0,
        image-to-image 0.8)."""
        return (1.0 if inpainting else 0.8) if strength is None else float(strength)

    def read_images(self, image: ImageInput, mask: bool = False) -> Tensor:
        """An image argument (a file, or (N, C, H, W) in [0, 1]) as the pipeline reads it: (N, C, H, W) in [0, 1] at
        the model's resolution and channels (``mask``: {0, 1}, 1 = regenerate)."""
        x = self._images(image, None, mask=mask)
        return x if mask else (x + 1) / 2

    def conditions(self, n: int | None, label=None, prompt=None, condition: Condition | None = None,
                   unconditional: bool = False) -> tuple[Condition | None, list[int], Tensor | None]:
        """(the condition of every sample or None for the null one, each sample's index within its request, the
        class labels or None). ``label`` / ``prompt``: one or a list; n samples of each, request by request."""
        conditional = not isinstance(self.conditioner, NoConditioning)
        asked = [x for x in (label, prompt, condition) if x is not None]
        if len(asked) > 1:
            raise UsageError("give label=, prompt= or condition=, not several")
        if unconditional and asked:
            raise UsageError("unconditional=True samples the null condition: drop label= / prompt= / condition=")
        if condition is not None:
            count = next(iter(condition.values())).shape[0]
            if n is not None and n != count:
                raise UsageError(f"the condition is for {count} samples, not n={n}")
            return condition, list(range(count)), condition.get("class_labels")
        n = 1 if n is None else n
        if label is None and prompt is None:
            if unconditional or not conditional:
                return None, list(range(n)), None
            examples = self.conditioner.examples(n, self.device)  # balanced: one class per grid row
            return examples, list(range(n)), examples.get("class_labels")
        values = _as_list(label if label is not None else prompt)
        if label is not None:
            values = self.label_indices(values)
        repeated = [v for v in values for _ in range(n)]
        index = [k for _ in values for k in range(n)]
        labels = torch.tensor(repeated, device=self.device) if label is not None else None
        if not conditional:  # an unconditional model takes labels only for classifier guidance
            if prompt is not None:
                raise UsageError("this is an unconditional model: drop prompt=")
            return None, index, labels
        kwargs = {"labels": repeated} if label is not None else {"prompts": repeated}
        return self.conditioner.from_request(**kwargs, device=self.device), index, labels

    @property
    def class_names(self) -> list[str] | None:
        """The names of a class-conditional model's classes (an image folder's subfolders), if it has them."""
        part = self._class_part()
        return None if part is None else part.class_names

    def _class_part(self) -> ClassConditioner | None:
        conditioner = self.conditioner
        parts = conditioner.parts.values() if isinstance(conditioner, MultiConditioner) else [conditioner]
        return next((part for part in parts if isinstance(part, ClassConditioner)), None)

    def label_indices(self, labels: Sequence[int | str]) -> list[int]:
        """Labels as class indices: class names (``label="circle"``) through the model's names, integers as given."""
        part = self._class_part()
        if part is not None:
            return part.label_indices(labels)
        if any(isinstance(label, str) for label in labels):
            raise UsageError(f"class names ({labels}) need a class-conditional model: ask with label=K")
        return [int(label) for label in labels]

    def _generators(self, count: int, index: list[int], seed, generator) -> list[torch.Generator] | torch.Generator:
        if generator is not None:
            return generator
        if seed is None:
            seed = random.randrange(2**31)
        seeds = [seed + k for k in index] if isinstance(seed, int) else list(seed)
        if len(seeds) != count:
            raise UsageError(f"{len(seeds)} seeds for {count} samples: give one seed, or one per sample")
        # CPU generators: a seed's noise is the same on every device
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _images(self, image: ImageInput | None, count: int | None, mask: bool = False) -> Tensor | None:
        """An image (or mask) argument as (count, C, H, W) on the device (count None: as many as given): [-1, 1]
        images, {0, 1} masks."""
        if image is None:
            return None
        from difflab.data.images import load_image, load_mask

        channels, size = self.pixel_shape[0], self.pixel_shape[-1]
        if isinstance(image, (str, Path)):
            x = load_mask(image, size) if mask else load_image(image, channels, size)
        else:
            x = image.float()
            x = x[None] if x.ndim == 3 else x
            x = x if mask else x * 2 - 1
        count = x.shape[0] if count is None else count
        if x.shape[0] not in (1, count):
            raise UsageError(f"{x.shape[0]} {'masks' if mask else 'images'} for {count} samples: give 1 or {count}")
        return x.to(self.device).expand(count, -1, -1, -1)

    # ---- generation -----------------------------------------------------------------------------------

    def __call__(self, n: int | None = None, *, label: int | str | Sequence[int | str] | None = None,
                 prompt: str | Sequence[str] | None = None, condition: Condition | None = None,
                 unconditional: bool = False, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                 sampler: Sampler | str | None = None, steps: int | None = None,
                 seed: int | Sequence[int] | None = None, generator=None, noise: Tensor | None = None,
                 init_image: ImageInput | None = None, strength: float | None = None, mask: ImageInput | None = None,
                 resample: int = 1, classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
                 classifier_scale: float = 1.0, batch_size: int = 64, progress: bool = True,
                 part: range | None = None) -> Tensor:
        """Samples (N, C, H, W) in [0, 1]: n for each label / prompt (or n of the conditioner's balanced examples
        when a conditional model is given none; ``unconditional=True`` asks for the null condition).

        ``guidance_scale``: classifier-free guidance w (default: the model's). ``seed``: sample k of each request
        uses seed + k (the same noise for every prompt), or a list of one seed per sample; ``generator``: instead,
        one torch.Generator (results then depend on the batching) or one per sample. ``noise``: the initial state
        (N, *image_shape), e.g. from ``invert``. ``init_image`` (+ ``strength``, default 0.8): image-to-image
        (SDEdit); with ``mask`` (1 = regenerate; ``strength`` default 1) RePaint inpainting. ``classifier``:
        ``classifier(x_t, t) -> logits`` for classifier guidance toward ``label`` with ``classifier_scale``.
        ``part``: make only the samples whose index within their request is in it (one device's share of a job
        split across devices, ``all_ranks.share(n)``), each with the seed and condition it has in the whole job.
        """
        if n is None and condition is None:  # as many as the given noise / images, per request
            given = noise if noise is not None else init_image if isinstance(init_image, Tensor) else None
            requests = len(_as_list(label if label is not None else prompt)) if (label, prompt) != (None, None) else 1
            n = given.shape[0] // requests if given is not None and given.ndim == 4 else 1
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        cond, index, labels = self.conditions(n, label, prompt, condition, unconditional)
        if part is not None:
            if noise is not None or not isinstance(seed, int):
                raise UsageError("part= takes the job's seed (an int), not noise= or a list of seeds")
            cond, index, labels = _select(cond, index, labels, [p for p, k in enumerate(index) if k in part])
        count = len(index)
        if classifier is not None and labels is None:
            raise UsageError("classifier guidance needs the classes to guide toward: label=K (or a list)")
        if classifier is None and labels is not None and isinstance(self.conditioner, NoConditioning):
            raise UsageError("this is an unconditional model: drop label= (or guide it toward a class with a noisy "
                             "classifier: classifier=, sample.py classifier_ckpt=PATH)")
        if mask is not None and init_image is None:
            raise UsageError("mask= needs the image to inpaint: pass init_image= with mask=")
        if noise is not None and tuple(noise.shape) != (count, *self.image_shape):
            raise UsageError(f"noise of shape {tuple(noise.shape)}, expected {(count, *self.image_shape)}")
        sampler = self.resolve_sampler(sampler, steps)
        scale = self.resolve_guidance(guidance_scale)
        generators = self._generators(count, index, seed, generator)
        init = self._images(init_image, count)
        masks = self._images(mask, count, mask=True)
        strength = self.resolve_strength(strength, mask is not None)
        out = []
        with self._eval():
            for start in tqdm(range(0, count, batch_size), desc="sampling", leave=False,
                              disable=not progress or count <= batch_size):
                rows = slice(start, min(start + batch_size, count))
                gens = generators[rows] if isinstance(generators, (list, tuple)) else generators
                out.append(self._batch(
                    sampler, rows, cond, scale, guidance_rescale, gens, noise, init, masks, strength, resample,
                    None if classifier is None else (classifier, labels[rows], classifier_scale), progress))
        return torch.cat(out)

    def _batch(self, sampler, rows, cond, scale, rescale, generator, noise, init, masks, strength, resample,
               classifier, progress) -> Tensor:
        """One batch of ``__call__``: the rows ``rows`` of its inputs."""
        b = rows.stop - rows.start
        grid = sampler.grid(self.schedule)
        x_T = noise[rows].to(self.device) if noise is not None else randn((b, *self.image_shape), generator,
                                                                          self.device)
        init, mask = (None if t is None else t[rows] for t in (init, masks))
        known = None
        if init is not None:
            known = self.encode(init)
            start = strength_start_index(len(grid), strength)
            if start == len(grid):  # strength 0: nothing to denoise
                return self._overlay(self.decode(known), init, mask)
            grid = grid.from_index(start)
            if start > 0:
                x_T = noise_to_start(grid, known, x_T)
        denoiser = self.denoiser(None if cond is None else {k: v[rows] for k, v in cond.items()}, b, scale, rescale)
        if classifier is not None:
            denoiser = ClassifierGuidance(denoiser, classifier[0], classifier[1], classifier[2])
        if mask is not None:
            x0 = repaint(sampler, denoiser, x_T, known, self._latent_mask(mask), grid, generator=generator,
                         resample=resample, progress=progress)
        else:
            x0 = sampler.sample(denoiser, x_T, grid, generator=generator, progress=progress)
        return self._overlay(self.decode(x0), init, mask)

    def denoiser(self, condition: Condition | None, n: int, guidance_scale: float | None = None,
                 guidance_rescale: float = 0.0) -> Denoiser:
        """The ``Denoiser`` for a batch of n: the network under ``condition`` with classifier-free guidance
        (``None``: the null condition, one forward)."""
        null = self.conditioner.null(n, self.device)
        if not condition:
            model = Conditioned(self.network, null)
        else:
            model = ClassifierFreeGuidance(self.network, condition, null, self.resolve_guidance(guidance_scale),
                                           guidance_rescale)
        return Denoiser(model, self.schedule, self.prediction)

    @staticmethod
    def _overlay(images: Tensor, init: Tensor | None, mask: Tensor | None) -> Tensor:
        """Images in [-1, 1] -> [0, 1]; for inpainting the input's pixels outside the mask are pasted back (exact in
        pixel space for latent models, whose decoder only approximates them)."""
        if mask is not None:
            mask = mask.to(images)
            images = mask * images + (1 - mask) * init.to(images)
        return (images + 1) / 2

    # ---- inversion --------------------------------------------------------------------------------------

    def invert(self, images: ImageInput, *, label: int | str | Sequence[int | str] | None = None,
               prompt: str | Sequence[str] | None = None, guidance_scale: float = 1.0,
               sampler: Sampler | str | None = None, steps: int | None = None, fixed_point_iterations: int = 1,
               progress: bool = True) -> Tensor:
        """DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F) of images (B, C, H, W) in
        [0, 1] (or a file) to the x_T that the same deterministic sampler maps back to them: ``pipe(noise=x_T)``
        under the same condition reconstructs the input, under another edits it. Guidance 1 (the default)
        inverts with the plain conditional model, which inverts faithfully; stronger guidance does not."""
        sampler = require_invertible(self.resolve_sampler(sampler, steps))
        x = self._images(images, None)
        b, cond = x.shape[0], None
        if label is not None or prompt is not None:  # one for all images, or one per image
            cond, _, _ = self.conditions(b if isinstance(label if label is not None else prompt, (int, str)) else 1,
                                         label, prompt)
        with self._eval():
            denoiser = self.denoiser(cond, b, guidance_scale)
            return sampler.invert(denoiser, self.encode(x), fixed_point_iterations=fixed_point_iterations,
                                  progress=progress)

    # ---- output ---------------------------------------------------------------------------------------------

    @staticmethod
    def to_pil(images: Tensor) -> list:
        """Images (N, C, H, W) in [0, 1] as PIL images."""
        from torchvision.transforms.functional import to_pil_image

        return [to_pil_image(image.float().clamp(0, 1).cpu()) for image in images]

    @staticmethod
    def save(images: Tensor, folder: str | Path, names: Sequence[str] | None = None) -> list[Path]:
        """Write images (N, C, H, W) in [0, 1] as PNGs into ``folder`` (``0000.png``, ... unless ``names``)."""
        from torchvision.utils import save_image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = names or [f"{i:04d}.png" for i in range(len(images))]
        paths = [folder / name for name in names]
        for image, path in zip(images, paths, strict=True):
            with atomic_write(path) as tmp:  # a viewer or an evaluation never reads half an image
                save_image(image.float().cpu(), tmp)
        return paths


def _as_list(value) -> list:
    """A label / prompt argument as a list (one request each)."""
    return [value] if isinstance(value, (int, str)) else list(value)


def _select(cond: Condition | None, index: list[int], labels: Tensor | None,
            rows: list[int]) -> tuple[Condition | None, list[int], Tensor | None]:
    """The rows ``rows`` of ``conditions``' (condition, index, labels)."""
    picked = torch.tensor(rows, dtype=torch.long)
    return (None if cond is None else {key: value[picked.to(value.device)] for key, value in cond.items()},
            [index[p] for p in rows], None if labels is None else labels[picked.to(labels.device)])
