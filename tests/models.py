"""Tiny real models shared by the tests (no trainer source is needed by the server)."""

from __future__ import annotations

import torch
from torch import nn


class PolicyMLP(nn.Module):
    """The RL policy the issues measure: obs 64 -> 256 -> 256 -> 16."""

    def __init__(self, obs: int = 64, hidden: int = 256, actions: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class StepProbe(nn.Module):
    """y = x @ W.T + b with every weight equal to the step: outputs reveal the step served."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def probe_weights(step: int, n: int = 4) -> dict[str, torch.Tensor]:
    """StepProbe weights that make every output equal ``step * (sum(x) + 1)``."""
    return {"lin.weight": torch.full((2, n), float(step)), "lin.bias": torch.full((2,), float(step))}


class DictPolicy(nn.Module):
    """Nested inputs and outputs: a dict observation, a keyword input, a dict+tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.aux = nn.Linear(2, 3)

    def forward(self, obs: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, object]:
        h = self.enc(obs["x"]) + self.aux(obs["y"])
        if mask is not None:
            h = h * mask
        return {"logits": h, "value": (h.sum(-1, keepdim=True),)}


class BranchyPolicy(nn.Module):
    """Data-dependent control flow, which torch.export refuses: the batch's sign picks the answer.

    ``lin(x)`` when ``x.sum() > 0``, else ``-lin(x)``. Its constructor takes arguments and
    records them in ``bray_init_kwargs`` (JSON values), so a server can rebuild it eagerly.
    """

    def __init__(self, n: int = 4, actions: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(n, actions)
        self.bray_init_kwargs = {"n": n, "actions": actions}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if x.sum() > 0:
            return y
        return -y
