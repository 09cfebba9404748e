"""Kubernetes liveness and readiness probes for TorchServe with token authorization on.

TorchServe 0.12 answers ``GET /ping`` without the inference key with 400
(InvalidKeyException), so kubelet's ``httpGet`` probe fails as soon as token
authorization is on, which bray-serve keeps on. This is an ``exec`` probe instead: it
runs inside the container, reads the key file TorchServe wrote into its working
directory, regenerates an expired key through the API key, and pings::

    python -m bray.ts_config.probe --ready     # exit 0 when /ping answers 200 (workers up)
    python -m bray.ts_config.probe --live      # exit 0 when the frontend answers at all

Addresses default from ``BRAY_PROBE_URL`` (inference) and ``BRAY_MANAGEMENT_URL``, the
key file from ``BRAY_KEY_FILE`` (else where :func:`bray.locations.find_key_file` looks).
Exit 0: healthy; 1: not, with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bray.locations import find_key_file

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8085"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"


def main(argv: list[str] | None = None) -> int:
    """Run one probe; returns the exit code (0 healthy, 1 not, 2 usage)."""
    parser = argparse.ArgumentParser(prog="python -m bray.ts_config.probe",
                                     description="Ping TorchServe with its inference key (token auth on).")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--ready", action="store_true", help="healthy only when /ping answers 200 (the default)")
    kind.add_argument("--live", action="store_true",
                      help="healthy when the frontend answers at all (a restarting worker is not a dead pod)")
    parser.add_argument("--url", default=os.environ.get("BRAY_PROBE_URL", DEFAULT_URL),
                        help=f"inference address (default $BRAY_PROBE_URL or {DEFAULT_URL})")
    parser.add_argument("--management", default=os.environ.get("BRAY_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL),
                        help="management address, where expired keys are regenerated "
                             f"(default $BRAY_MANAGEMENT_URL or {DEFAULT_MANAGEMENT_URL})")
    parser.add_argument("--key-file", help="TorchServe's key_file.json (default $BRAY_KEY_FILE, ./key_file.json)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="per HTTP call (default 3)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2

    from bray.torchserve.auth import TokenAuth
    from bray.torchserve.launcher import ping_status

    key_file = Path(args.key_file) if args.key_file else find_key_file()
    if key_file is None or not key_file.is_file():
        print(f"probe: no TorchServe key file at {key_file or './key_file.json'} (TorchServe writes it into its "
              "working directory at start; set BRAY_KEY_FILE to that path)", file=sys.stderr)
        return 1
    auth = TokenAuth(key_file, management_url=args.management)
    try:
        status = ping_status(args.url, auth, timeout_s=args.timeout_s)
    finally:
        auth.close()
    if status is None:
        print(f"probe: nothing answers at {args.url}/ping", file=sys.stderr)
        return 1
    if args.live or status == 200:
        return 0
    print(f"probe: {args.url}/ping answered {status} (workers not ready, or the key in {key_file} was refused)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
