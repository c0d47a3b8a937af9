"""A second digit classifier, independent of the first (``classifier.py``), to check what was tuned on the first:
another architecture (5x5 convolutions with BatchNorm and ReLU, a flattened fully connected layer instead of global
pooling), another seed, and trained on the 1000 digits the first held out, tested on the 4000 it was trained on.
Its 256-d penultimate features give a second digit FID (``extractor=digit_check``).

The shipped weights (``weights/mnist_check_classifier.safetensors``) were trained by
``python -m difflab.metrics.check_classifier train``; ``... test`` reports the accuracy on its held-out digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor, nn

from difflab.errors import MissingFileError
from difflab.metrics.classifier import mnist_split, predict, save_classifier, train_classifier

WEIGHTS = Path(__file__).parent / "weights" / "mnist_check_classifier.safetensors"
SEED = 1  # the first classifier's is 0


class CheckClassifier(nn.Module):
    """conv 5x5 (32) - pool - conv 5x5 (64) - pool - conv 3x3 (64) - pool, each conv with BatchNorm and ReLU, then a
    256-unit fully connected layer on the flattened 4x4 map (the features) and a linear head. Input (B, 1, 32, 32)
    in [-1, 1]."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()

        def block(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, 32, 5), nn.MaxPool2d(2), *block(32, 64, 5), nn.MaxPool2d(2),
                                  *block(64, 64, 3), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64 * 4 * 4, 256), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, num_classes))
        self.feature_dim = 256

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def check_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, labels, test images, labels): the first classifier's split, the other way round."""
    train_x, train_y, test_x, test_y = mnist_split()
    return test_x, test_y, train_x, train_y


def train_check_classifier(images: Tensor, labels: Tensor, *, epochs: int = 40, progress: bool = False,
                           seed: int = SEED) -> CheckClassifier:
    model = CheckClassifier(num_classes=int(labels.max()) + 1, in_channels=images.shape[1])
    return train_classifier(images, labels, epochs=epochs, lr=2e-3, seed=seed, progress=progress, model=model)


def load_check_classifier(path: str | Path = WEIGHTS) -> CheckClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no classifier weights at {path}; train them with "
                               "`python -m difflab.metrics.check_classifier train --out PATH`")
    model = CheckClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or test the second (check) MNIST digit classifier.")
    parser.add_argument("command", choices=["train", "test"])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="weights file (train: written; test: read)")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    train_x, train_y, test_x, test_y = check_split()
    if args.command == "train":
        save_classifier(train_check_classifier(train_x, train_y, epochs=args.epochs, progress=True), args.out)
    model = load_check_classifier(args.out)
    accuracy = (predict(model, test_x).argmax(-1) == test_y).float().mean().item()
    print(f"accuracy on the {len(test_x)} held-out digits (the first classifier's training digits): {accuracy:.4f}")


if __name__ == "__main__":
    main()
