"""One-line errors for the Hydra mains: a mistake in the command line (an unknown key or option, a missing
mandatory value, a bad argument) prints one line naming the value and the fix, and exits with status 2, leaving no
empty run directory behind; a run stopped for a reason its message explains (``RunStopped``) prints it as one line
and exits with status 1. ``HYDRA_FULL_ERROR=1`` shows the full traceback instead; any other error goes to
Hydra's usual report (exit status 1)."""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from difflab.conf import CONFIG_PACKAGE
from difflab.errors import MissingExtraError, RunStopped, UsageError

EXIT_USAGE = 2  # as argparse: the command line was wrong
EXIT_STOPPED = 1  # a run stopped for a reason its message explains (RunStopped)
FULL_ERROR = "HYDRA_FULL_ERROR"
# the user's own HYDRA_FULL_ERROR while ours forces it on during composition (an environment variable, so that a
# sweep point run in another process by a launcher sees it too)
USER_FULL_ERROR = "DIFFLAB_USER_HYDRA_FULL_ERROR"
USER_ERRORS = (UsageError, FileNotFoundError, MissingExtraError, MissingMandatoryValue,
               InterpolationToMissingValueError)
STARTED = time.time()  # files in a run directory older than this were not written by this process
# what Hydra and train.py write into a run directory before any training: an error then leaves nothing of value
SCAFFOLDING = {".hydra", "config.yaml"}
PLACEHOLDERS = {"root": "DIR", "ckpt": "PATH", "train_urls": "DIR"}  # the value a missing key takes, for the fix


def hydra_main(config_name: str, unused: Callable[[DictConfig], tuple[str, ...]] | None = None
               ) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """``@hydra.main`` on ``conf/<config_name>.yaml`` with one-line user errors. ``unused(cfg)``: the config
    nodes this run will not read (their ``???`` values are not asked for). ``main.__wrapped__(cfg)`` is the task
    itself, errors as raised."""

    def decorator(task: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(task)
        def task_with_errors(cfg: DictConfig) -> Any:
            restore_full_error()  # errors of the task itself: the user's setting decides
            try:
                refuse_missing_values(cfg, unused(cfg) if unused is not None else ())
                return task(cfg)
            except Exception as err:
                stopped = next((c for c in causes(err) if isinstance(c, RunStopped)), None)
                if stopped is not None and os.environ.get(FULL_ERROR) != "1":
                    fail(str(stopped), EXIT_STOPPED)  # its run directory holds what it wrote: kept
                message = user_error_message(err)
                if message is not None:
                    remove_empty_run_dir()
                if message is None or os.environ.get(FULL_ERROR) == "1":
                    raise  # to Hydra's usual report, or the full traceback
                fail(message)

        hydra_main_ = hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name=config_name)
        run_hydra = hydra_main_(task_with_errors)

        @functools.wraps(task)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is not None:  # called from Python with a composed config: errors as raised
                return task(cfg_passthrough)
            user_setting = os.environ.get(FULL_ERROR)
            if user_setting == "1":
                return run_hydra()
            # Hydra prints its own multi-line report of a composition error and exits 1 unless HYDRA_FULL_ERROR is
            # set: set, it raises them to us (the task puts the user's setting back before it runs)
            os.environ[USER_FULL_ERROR] = user_setting or ""
            os.environ[FULL_ERROR] = "1"
            try:
                return run_hydra()
            except Exception as err:
                composing = USER_FULL_ERROR in os.environ  # the task never started
                restore_full_error()
                message = composition_error_message(err) if composing else user_error_message(err)
                if message is not None:
                    fail(message)
                from hydra._internal.utils import run_and_report

                run_and_report(functools.partial(_reraise, err))  # Hydra's report, exit 1
            finally:
                restore_full_error()

        return main

    return decorator


def restore_full_error() -> None:
    """Put the user's HYDRA_FULL_ERROR back (unset if it was)."""
    if USER_FULL_ERROR not in os.environ:
        return
    user_setting = os.environ.pop(USER_FULL_ERROR)
    if user_setting:
        os.environ[FULL_ERROR] = user_setting
    else:
        os.environ.pop(FULL_ERROR, None)


def _reraise(err: BaseException) -> None:
    raise err


def fail(message: str, status: int = EXIT_USAGE) -> None:
    """Print the one line to stderr and exit with ``status`` (SystemExit passes through Hydra)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "difflab"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if program == "__main__.py" and spec is not None:  # python -m difflab.probe: the package, not its __main__ file
        program = f"python -m {spec.name.removesuffix('.__main__')}"
    sys.stderr.write(f"{program}: error: {one_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its explicit causes (``raise ... from``: how Hydra's instantiate wraps a constructor's error)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of an error the user's input caused, None for any other."""
    for cause in causes(err):
        if isinstance(cause, (MissingMandatoryValue, InterpolationToMissingValueError)):
            found = re.search(r"Missing mandatory value: ?([\w.\[\]]+)", str(cause))
            return missing_message([found.group(1) if found else str(cause.full_key)])
        if isinstance(cause, USER_ERRORS):
            return one_line(str(cause))
    return None


def composition_error_message(err: BaseException) -> str | None:
    """The one-line message of an error composing the config from the command line (an unknown key or option, an
    override that does not parse); None when it is not one."""
    if not isinstance(err, HydraException):  # e.g. Hydra's ValueError for logger=null: still the command line's
        return user_error_message(err) or f"{one_line(str(err))} ({FULL_ERROR}=1 for the traceback)"
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not an option{did_you_mean(name, err.options, f'{group}=')}: " \
               f"valid: {', '.join(err.options)}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {one_line(err.message)}"
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if isinstance(cause, OmegaConfBaseException) and full_key and isinstance(parent, DictConfig) \
            and "not in struct" in str(cause):
        prefix, _, key = str(full_key).rpartition(".")
        prefix = f"{prefix}." if prefix else ""
        keys = [str(k) for k in parent.keys()]
        suggestion = did_you_mean(key, keys, prefix)
        if not suggestion:
            shown = ", ".join(sorted(keys)[:20]) + (", ..." if len(keys) > 20 else "")
            suggestion = f" ({prefix[:-1] or 'the config'} has: {shown})"
        append = re.search(r"use (\+\S+)", str(err))
        new_key = f" (a new key is added with {append.group(1)})" if append else ""
        return f"unknown key {full_key}{suggestion}{new_key}"
    text = one_line(str(err))
    if isinstance(cause, OmegaConfBaseException):
        text += f": {one_line(str(cause).split(chr(10))[0])}"
    return text


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f": did you mean {prefix}{close[0]}?" if close else ""


def missing_values(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted keys of the ``???`` values under ``node``, without resolving interpolations (unlike
    ``OmegaConf.missing_keys``, which fails on ``${data.root}`` pointing at a missing value)."""
    if isinstance(node, DictConfig):
        keys = [str(k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        keys = [str(i) for i in range(len(node))]
    else:
        return
    for key in keys:
        index: Any = int(key) if isinstance(node, ListConfig) else key
        if OmegaConf.is_missing(node, index):
            yield f"{prefix}{key}"
            continue
        child = node._get_node(index)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            yield from missing_values(child, f"{prefix}{key}.")


def refuse_missing_values(cfg: DictConfig, unused: tuple[str, ...] = ()) -> None:
    """Raise ``UsageError`` naming every ``???`` value the run will read (all but those under ``unused``), before
    anything is built."""
    missing = [key for key in missing_values(cfg)
               if not any(key == node or key.startswith(f"{node}.") for node in unused)]
    if missing:
        raise UsageError(missing_message(missing))


def missing_message(keys: list[str]) -> str:
    """'data.root is required for data=imagefolder: add data.root=DIR'."""
    chosen = []
    for key in keys:
        choice = group_choice(key)
        if choice and choice not in chosen:
            chosen.append(choice)
    verb = "is" if len(keys) == 1 else "are"
    source = f" for {' '.join(chosen)}" if chosen else ""
    fix = " ".join(f"{key}={PLACEHOLDERS.get(key.rpartition('.')[2], 'VALUE')}" for key in keys)
    return f"{' and '.join(keys)} {verb} required{source}: add {fix}"


def group_choice(key: str) -> str | None:
    """'data=imagefolder' for 'data.root': the command-line choice of the config group the key comes from."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choices = HydraConfig.get().runtime.choices
    groups = [g for g in choices if key.startswith(g.replace("/", ".") + ".") and choices[g] is not None]
    if not groups:
        return None
    group = max(groups, key=len)
    return f"{group}={choices[group]}"


def remove_empty_run_dir() -> None:
    """This job's output directory, removed if the failed command wrote nothing of value there."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        remove_if_scaffolding(Path(HydraConfig.get().runtime.output_dir))


def remove_if_scaffolding(run_dir: Path, since: float = STARTED) -> bool:
    """Remove ``run_dir`` if it holds only what Hydra and train.py write before any training (``.hydra/``,
    ``*.log``, ``config.yaml``), all written after ``since`` (this process's start), and its date folder
    (outputs/<date>) if that is left empty. Never the working directory or one above it. True if removed."""
    run_dir, cwd = run_dir.resolve(), Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir == cwd or run_dir in cwd.parents:
        return False
    entries = list(run_dir.iterdir())
    if any(e.name not in SCAFFOLDING and not (e.is_file() and e.suffix == ".log") for e in entries):
        return False
    files = [p for e in entries for p in ([e] if not e.is_dir() else [e, *e.rglob("*")])]
    if any(p.is_symlink() or p.stat().st_mtime < since - 1 for p in files):
        return False
    for handler in list(logging.getLogger().handlers):  # Hydra's <task>.log: closed before its folder goes
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    if parent.parent.name in ("outputs", "multirun") and parent != cwd and not any(parent.iterdir()):
        parent.rmdir()
    return not run_dir.exists()
