"""Conditioners turn a batch (or a user's labels / prompts) into the keyword arguments the denoiser takes
(``class_labels``, ``context``, ``context_mask``, ``cond``), and know the null condition that classifier-free
guidance needs (Ho & Salimans 2022): during training each example's condition is replaced by the null one with
probability ``drop_prob``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from difflab.errors import UsageError

Condition = dict[str, Tensor]  # keyword arguments of the network


class Conditioner(nn.Module):
    """Base class. Subclasses implement ``forward(batch)``, ``null(n, device)`` and ``drop(condition, keep)``,
    and may implement ``from_request`` (labels / prompts given by a user) and ``examples(n)``."""

    def __init__(self, drop_prob: float = 0.1):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, batch: dict) -> Condition:
        raise NotImplementedError

    def null(self, n: int, device: torch.device | str = "cpu") -> Condition:
        raise NotImplementedError

    def drop(self, condition: Condition, keep: Tensor) -> Condition:
        """The condition with the examples where ``keep`` (B,) is False replaced by the null condition."""
        raise NotImplementedError

    def from_request(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> Condition:
        raise ValueError(f"{type(self).__name__} takes neither labels nor prompts")

    def examples(self, n: int, device: torch.device | str = "cpu") -> Condition:
        """A condition for n preview samples (sample grids): the null condition unless overridden."""
        return self.null(n, device)

    def training_condition(self, batch: dict, generator: torch.Generator | None = None) -> Condition:
        """The batch's condition with each example dropped to null with probability ``drop_prob``."""
        condition = self(batch)
        n = _batch_size(condition, batch)
        if self.drop_prob == 0:
            return condition
        device = next(iter(condition.values())).device
        keep = torch.rand(n, generator=generator, device=generator.device if generator else device) >= self.drop_prob
        return self.drop(condition, keep.to(device))


def _batch_size(condition: Condition, batch: dict) -> int:
    for value in condition.values():
        return value.shape[0]
    return len(batch["image"])


class NoConditioning(Conditioner):
    """Unconditional training (``conditioning=none``)."""

    def __init__(self):
        super().__init__(drop_prob=0.0)

    def forward(self, batch: dict) -> Condition:
        return {}

    def null(self, n: int, device: torch.device | str = "cpu") -> Condition:
        return {}

    def drop(self, condition: Condition, keep: Tensor) -> Condition:
        return condition


class ClassConditioner(Conditioner):
    """Class labels, embedded by the network's class table (``network.num_classes``), whose extra learned
    row ``num_classes`` is the null class. ``class_names`` (an image folder's class subfolders) let users ask for
    a class by name."""

    def __init__(self, num_classes: int | None, drop_prob: float = 0.1, class_names: Sequence[str] | None = None):
        super().__init__(drop_prob)
        if not num_classes or num_classes < 1:
            raise UsageError(f"conditioning=class needs the number of classes, got {num_classes!r}: give the images "
                             "class subfolders, set data.num_classes=K, or train without labels: conditioning=none")
        if class_names is not None and len(class_names) > num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None

    def label_indices(self, labels: Sequence[int | str]) -> list[int]:
        """Labels as class indices: names through ``class_names``, integers as they are (checked either way)."""
        indices = []
        for label in labels:
            if isinstance(label, str):
                if not self.class_names or label not in self.class_names:
                    known = f"its classes: {', '.join(self.class_names)}" if self.class_names else \
                        f"it has no class names: ask with label=K, K in 0..{self.num_classes - 1}"
                    raise UsageError(f"unknown class {label!r}; {known}")
                label = self.class_names.index(label)
            if not 0 <= int(label) < self.num_classes:
                raise UsageError(f"label={label} is out of range: this model's classes are 0..{self.num_classes - 1}")
            indices.append(int(label))
        return indices

    def forward(self, batch: dict) -> Condition:
        labels = torch.as_tensor(batch["label"]).long()
        if (labels < 0).any() or (labels >= self.num_classes).any():
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"label {bad} outside 0..{self.num_classes - 1}: is the dataset labelled? "
                             "(unlabelled data: conditioning=none or conditioning=text)")
        return {"class_labels": labels}

    def null(self, n: int, device: torch.device | str = "cpu") -> Condition:
        return {"class_labels": torch.full((n,), self.num_classes, dtype=torch.long, device=device)}

    def drop(self, condition: Condition, keep: Tensor) -> Condition:
        labels = condition["class_labels"]
        return {**condition, "class_labels": torch.where(keep, labels, torch.full_like(labels, self.num_classes))}

    def from_request(self, labels: Sequence[int | str] | None = None, prompts: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> Condition:
        if prompts:
            raise UsageError("this model is class-conditional: ask with label=K, not prompt=...")
        if labels is None:
            raise UsageError(f"this model is class-conditional: give label=K with K in 0..{self.num_classes - 1}")
        return {"class_labels": torch.tensor(self.label_indices(labels), dtype=torch.long, device=device)}

    def examples(self, n: int, device: torch.device | str = "cpu") -> Condition:
        """Every class in turn, in contiguous blocks: a 10 x 10 grid of 100 samples has one digit per row."""
        return {"class_labels": torch.tensor(example_indices(n, self.num_classes), device=device)}


def example_indices(n: int, k: int) -> list[int]:
    """n indices over k examples: contiguous equal blocks when n >= k (rows of a grid), else 0..n-1."""
    return [(i * k) // n for i in range(n)] if n >= k else list(range(n))


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions along the batch, padding token sequences (and their masks) to the longer one."""
    if a.keys() != b.keys():
        raise ValueError(f"conditions have different keys: {sorted(a)} vs {sorted(b)}")
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if key in ("context", "context_mask"):
            length = max(x.shape[1], y.shape[1])
            x, y = pad_tokens(x, length), pad_tokens(y, length)
        out[key] = torch.cat([x, y])
    return out


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """Pad a (B, L, ...) token sequence or (B, L) mask with zeros (False) to ``length`` tokens."""
    if x.shape[1] >= length:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))], dim=1)


class MultiConditioner(Conditioner):
    """Several conditions at once (e.g. class and text), each dropped to its own null independently with its
    own ``drop_prob``: a training example may keep its label and lose its caption, or the reverse, or both
    (as in multi-condition classifier-free guidance, Liu et al. 2022). The null of the whole is every part's
    null. Parts must give disjoint network keywords."""

    def __init__(self, parts: dict[str, Conditioner]):
        super().__init__(drop_prob=0.0)
        if not parts:
            raise ValueError("MultiConditioner needs at least one part")
        self.parts = nn.ModuleDict(parts)

    def _merge(self, conditions: list[Condition]) -> Condition:
        merged: Condition = {}
        for condition in conditions:
            clash = merged.keys() & condition.keys()
            if clash:
                raise ValueError(f"conditioners give the same network input(s) {sorted(clash)}")
            merged.update(condition)
        return merged

    def forward(self, batch: dict) -> Condition:
        return self._merge([part(batch) for part in self.parts.values()])

    def null(self, n: int, device: torch.device | str = "cpu") -> Condition:
        return self._merge([part.null(n, device) for part in self.parts.values()])

    def training_condition(self, batch: dict, generator: torch.Generator | None = None) -> Condition:
        return self._merge([part.training_condition(batch, generator) for part in self.parts.values()])

    def drop(self, condition: Condition, keep: Tensor) -> Condition:
        """Drop every part where ``keep`` is False (the joint null)."""
        parts = []
        for part in self.parts.values():
            own = part.null(1, keep.device).keys()
            parts.append(part.drop({k: v for k, v in condition.items() if k in own}, keep))
        return self._merge(parts)

    def from_request(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> Condition:
        """Class parts take the labels, the others the prompts; a part given nothing gets its null."""
        n = len(labels) if labels is not None else len(prompts) if prompts is not None else 0
        if n == 0:
            raise UsageError("give label= or prompt=")
        conditions = []
        for part in self.parts.values():
            if isinstance(part, ClassConditioner):
                given = None if labels is None else part.from_request(labels=labels, device=device)
            else:
                given = None if prompts is None else part.from_request(prompts=prompts, device=device)
            conditions.append(part.null(n, device) if given is None else given)
        return self._merge(conditions)

    def examples(self, n: int, device: torch.device | str = "cpu") -> Condition:
        return self._merge([part.examples(n, device) for part in self.parts.values()])
