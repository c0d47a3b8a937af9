"""``python -m difflab.ema reconstruct RUN_DIR sigma_rel=0.07 [step=N] [base=CKPT] [out=FILE]``: a checkpoint whose
EMA is the post-hoc reconstruction of length sigma_rel at step N (default: the last snapshot) from the snapshots of
an ``ema=posthoc`` run. ``sigma_rel='[0.05,0.07,0.1]'`` writes one per length; compare them with
``python evaluate.py compare='[A.ckpt,B.ckpt,...]'``."""

from __future__ import annotations

import argparse
import sys

from difflab.cli.errors import fail, user_error_message
from difflab.errors import UsageError

KEYS = ("sigma_rel", "step", "base", "out")


def parse(argv: list[str]) -> tuple[str, dict]:
    parser = argparse.ArgumentParser(prog="python -m difflab.ema", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["reconstruct"])
    parser.add_argument("run_dir")
    parser.add_argument("options", nargs="*", metavar="key=value", help=", ".join(KEYS))
    args = parser.parse_args(argv)
    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise UsageError(f"{item}: give key=value with a key among {', '.join(KEYS)}")
        options[key] = value
    if "sigma_rel" not in options:
        raise UsageError("give sigma_rel= (e.g. sigma_rel=0.07, or sigma_rel='[0.05,0.07,0.1]')")
    try:
        options["sigma_rel"] = [float(v) for v in options["sigma_rel"].strip("[]").split(",")]
        options["step"] = int(options["step"]) if "step" in options else None
    except ValueError as err:
        raise UsageError(f"sigma_rel takes numbers and step an integer: {err}") from err
    if "out" in options and len(options["sigma_rel"]) > 1:
        raise UsageError("out= names one file: give one sigma_rel, or leave out= for one file per length")
    return args.run_dir, options


def main(argv: list[str] | None = None) -> None:
    from difflab.ema.checkpoint import write_reconstructed

    try:
        run_dir, options = parse(sys.argv[1:] if argv is None else argv)
        for sigma_rel in options["sigma_rel"]:
            path, found = write_reconstructed(run_dir, sigma_rel, options["step"], options.get("base"),
                                              options.get("out"))
            print(f"sigma_rel={found.sigma_rel:g} at step {found.step} from {found.snapshots} snapshots "
                  f"(profile fit error {found.fit_error:.2%}): wrote {path}")
    except Exception as err:
        message = user_error_message(err)  # a bad run folder, snapshot or argument: one line, exit 2
        if message is None:
            raise
        fail(message)
