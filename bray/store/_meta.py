"""A published step's metadata (``meta.json``) and a loaded step: what the store's modules share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bray.errors import CorruptCheckpointError
from bray.store._layout import FORMAT_VERSION, corrupt

__all__ = ["Checkpoint", "StepMeta", "parse_meta"]


@dataclass(frozen=True)
class StepMeta:
    """What the store knows about one published step.

    Attributes:
        name: the model name.
        step: the step number.
        time: when it was published (unix seconds).
        nbytes: size of the weights file in bytes.
        sha256: hex sha256 of the weights file.
        keys: the flattened tensor names, sorted.
        checkpoint: whether retention keeps this step for good (the clonable pool).
    """

    name: str
    step: int
    time: float
    nbytes: int
    sha256: str
    keys: tuple[str, ...]
    checkpoint: bool


@dataclass(frozen=True)
class Checkpoint:
    """One loaded step: flat ``weights`` (numpy arrays or torch tensors) and its ``meta``."""

    name: str
    step: int
    weights: dict[str, Any]
    meta: StepMeta


def parse_meta(raw: bytes, name: str, step: int) -> StepMeta:
    """A step's ``meta.json``, checked against the step it was read for.

    Raises:
        CorruptCheckpointError: unreadable, from a newer format, or another step's.
    """
    try:
        doc = json.loads(raw)
        version = int(doc.get("format", 1))
        if version > FORMAT_VERSION:
            raise corrupt(name, step, f"meta.json has format {version}, newer than this "
                           f"bray-serve reads ({FORMAT_VERSION}); upgrade bray-serve")
        meta = StepMeta(
            name=name,
            step=int(doc["step"]),
            time=float(doc["time"]),
            nbytes=int(doc["nbytes"]),
            sha256=str(doc["sha256"]),
            keys=tuple(str(k) for k in doc["keys"]),
            checkpoint=bool(doc["checkpoint"]),
        )
    except CorruptCheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise corrupt(name, step, f"meta.json is unreadable ({err})") from err
    if meta.step != step:
        raise corrupt(name, step, f"meta.json says step {meta.step}")
    return meta
