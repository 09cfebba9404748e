"""The store's folder layout (names of every file and folder) and its name and step rules;
the layout itself is drawn in :mod:`bray.store`."""

from __future__ import annotations

import re
from bray.errors import ConfigError, CorruptCheckpointError, StepNotFoundError


FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "LATEST"
STEPS_DIR = "steps"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
CLONE_FILE = "clone.json"
LEAGUE_DIR = "league"
EXPORT_DIRNAME = "export"
#: The export's structure and engine record, written by :mod:`bray.export`.
SPEC_FILE = "spec.json"
SERVING_DIRNAME = ".serving"
#: Watchers' holds on the steps they have yet to archive (:mod:`bray.store._holds`).
HOLDS_DIR = ".holds"
STEP_DIGITS = 12
_MAX_STEP = 10**STEP_DIGITS - 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(name: object, what: str = "model name") -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{what} must be 1-128 characters of letters, digits, '_', '.' or '-', starting "
            f"with a letter or digit (it is a directory name), got {name!r}"
        )


def check_step(step: object) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= _MAX_STEP:
        raise ConfigError(f"step must be an integer from 0 to {_MAX_STEP}, got {step!r}")


def step_str(step: int) -> str:
    return f"{step:0{STEP_DIGITS}d}"


def corrupt(name: str, step: int, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"step {step} of {name!r} is corrupt: {why}; republish it or load another step",
        name=name, step=step,
    )


def vanished(name: str, step: int) -> StepNotFoundError:
    what = "the latest step" if step == -1 else f"step {step}"
    return StepNotFoundError(
        f"{what} of {name!r} kept disappearing while being read (retention or a deleted "
        "store racing the reader); try again", name=name, step=step,
    )
