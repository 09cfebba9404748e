"""Where things are: the checkpoint store, TorchServe's model store, its addresses, its key file.

One place reads the ``BRAY_*`` environment variables, so the bridge, the CLI and the
main job agree. Defaults match the bundled ``ts_config/config.properties`` started the
way the README says (from the directory that then holds ``key_file.json``).

==========================  =======================================  ===========================
variable                    meaning                                  default
==========================  =======================================  ===========================
``BRAY_STORE``              checkpoint store root                    ``~/.bray/store``
``BRAY_MODEL_STORE``        TorchServe model store (``.mar`` files)  ``~/.bray/model_store``
``BRAY_INFERENCE_URL``      one address, or several, comma-separated ``http://127.0.0.1:8080``
``BRAY_MANAGEMENT_URL``     management API address                   ``http://127.0.0.1:8081``
``BRAY_KEY_FILE``           TorchServe's ``key_file.json``           see :func:`find_key_file`
==========================  =======================================  ===========================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from bray.errors import ConfigError

__all__ = ["Locations", "find_key_file"]

DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"


def _home() -> Path:
    return Path(os.path.expanduser("~")) / ".bray"


def _split_urls(value: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in value.split(",") if u.strip())
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"inference address must start with http:// or https://, got {url!r}; "
                "set BRAY_INFERENCE_URL like 'http://127.0.0.1:8080,http://10.0.0.2:8080'"
            )
    return urls


def find_key_file(explicit: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Path | None:
    """Find TorchServe's ``key_file.json``.

    Looks, in order, at ``explicit``, ``BRAY_KEY_FILE``, ``./key_file.json`` and
    ``~/.bray/server/key_file.json`` (where ``scripts/main_job.py`` starts the server).

    Returns:
        The first path that exists, or ``None`` (token authorization may be off).
    """
    env = os.environ if env is None else env
    candidates: list[Path] = []
    if explicit:
        return Path(explicit)
    if env.get("BRAY_KEY_FILE"):
        return Path(env["BRAY_KEY_FILE"])
    candidates.append(Path.cwd() / "key_file.json")
    candidates.append(_home() / "server" / "key_file.json")
    for path in candidates:
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class Locations:
    """Resolved addresses and paths; build with :meth:`from_env`."""

    store: Path
    model_store: Path
    inference_urls: tuple[str, ...]
    management_url: str
    key_file: Path | None = field(default=None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "Locations":
        """Build from keyword overrides, else ``BRAY_*`` variables, else the defaults.

        Args:
            env: the environment to read (``os.environ`` when ``None``).
            **overrides: ``store``, ``model_store``, ``inference_url`` (str, comma list or
                sequence), ``management_url``, ``key_file``; ``None`` values are ignored.

        Raises:
            ConfigError: an unknown override or a malformed address.
        """
        env = os.environ if env is None else env
        known = {"store", "model_store", "inference_url", "management_url", "key_file"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown location option(s) {sorted(unknown)}; expected some of {sorted(known)}")
        o = {k: v for k, v in overrides.items() if v is not None}
        store = Path(str(o.get("store") or env.get("BRAY_STORE") or _home() / "store")).expanduser()
        model_store = Path(
            str(o.get("model_store") or env.get("BRAY_MODEL_STORE") or _home() / "model_store")
        ).expanduser()
        inf = o.get("inference_url") or env.get("BRAY_INFERENCE_URL") or DEFAULT_INFERENCE_URL
        urls = _split_urls(inf if isinstance(inf, str) else ",".join(str(u) for u in inf))  # type: ignore[attr-defined]
        if not urls:
            raise ConfigError("no inference address given; set BRAY_INFERENCE_URL")
        mgmt = str(o.get("management_url") or env.get("BRAY_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL)
        _split_urls(mgmt)
        key = o.get("key_file")
        key_file = find_key_file(str(key) if key else None, env)
        return cls(store=store, model_store=model_store, inference_urls=urls,
                   management_url=mgmt.rstrip("/"), key_file=key_file)
