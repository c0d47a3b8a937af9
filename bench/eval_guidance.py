"""Class accuracy of a conditional MNIST model's samples against the guidance scale, judged by the shipped
digit classifier (difflab.metrics.classifier; its own test accuracy is printed too).

    python bench/eval_guidance.py CKPT [--per-class 20] [--scales 0 1 3 5] [--steps 50] [--prompt "a handwritten {}"]

For text models, --prompt gives the template filled with each digit. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch

from difflab.loading import load_model
from difflab.metrics.classifier import conditional_accuracy, load_digit_classifier, mnist_split, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt", default=None, help='template for text models, e.g. "a handwritten {}"')
    args = parser.parse_args()
    classifier = load_digit_classifier()
    _, _, test_x, test_y = mnist_split()
    test_accuracy = (predict(classifier, test_x).argmax(-1) == test_y).float().mean().item()
    model = load_model(args.ckpt)
    sampler = model.pipeline().resolve_sampler(None, args.steps)
    results = conditional_accuracy(model, classifier, args.scales, args.per_class, prompt_template=args.prompt,
                                   sampler=sampler)
    print(f"classifier test accuracy on 1000 held-out real digits: {test_accuracy:.3f}")
    print(f"{args.ckpt}: {args.per_class} samples per digit, {sampler.name} {sampler.num_steps} steps")
    print("| guidance w | accuracy (asked digit) | recognisable (p >= 0.9) | class entropy |")
    print("| --- | --- | --- | --- |")
    for w, r in results.items():
        print(f"| {w:g} | {r['accuracy']:.3f} | {r['recognisable']:.3f} | {r['class_entropy']:.3f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
