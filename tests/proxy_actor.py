"""An actor process for the node-proxy tests: ``python -m tests.proxy_actor --name NAME ...``.

Calls a StepProbe model (``y = step * (sum(x) + 1)``) through ``RemoteModel(...,
node_proxy=True)`` with its own input value, so an answer meant for another actor, or
from another step than the one it claims, is caught. Prints one JSON line at the end:
answers, errors (messages), wrong answers, steps that went backwards, fallbacks to
direct HTTP, the first and last step, and the proxy's pid as last seen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--value", type=float, required=True, help="every input element")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--until-file", help="keep calling until this file exists (after --calls)")
    parser.add_argument("--weights", type=float, help="every weight, when not the step (a model published by hand)")
    parser.add_argument("--opponents", default="",
                        help="play a league: each round calls NAME, then the next of these clones (comma-separated), "
                             "the i-th's weights at its step s being every one 1000 * (i + 1) + s")
    parser.add_argument("--first-opponent", type=int, default=0,
                        help="the opponent of the first round (actors in step with each other then play different "
                             "opponents in the same round)")
    parser.add_argument("--nan", action="store_true", help="send NaN inputs (a bad input for a strict model)")
    parser.add_argument("--die-mid-call", action="store_true",
                        help="send one call to the proxy and SIGKILL this process before the answer")
    args = parser.parse_args()

    import bray
    from bray.bridge._slot import HEADER, OP_CALL

    rm = bray.RemoteModel(args.name, node_proxy=True)
    x = np.full((1, 4), np.nan if args.nan else args.value, np.float32)
    if args.die_mid_call:
        conn = rm.transport.proxy._take(True)
        nbytes = conn.slot.write({"args": [x]})
        conn.sock.sendall(HEADER.pack(OP_CALL, 1, -1, nbytes, conn.slot.size))
        print(json.dumps({"sent": True}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    opponents = [bray.RemoteModel(clone, node_proxy=True) for clone in args.opponents.split(",") if clone]
    last_of = [-1] * len(opponents)
    answers, wrong, backwards, last = 0, 0, 0, -1
    first: int | None = None
    errors: list[str] = []
    done = 0
    while done < args.calls or (args.until_file and not Path(args.until_file).exists()):
        done += 1
        try:
            out, step = rm(x, batch=True, return_step=True)
        except bray.BrayError as err:
            errors.append(f"{type(err).__name__}: {err}")
            continue
        answers += 1
        first = step if first is None else first
        if not np.allclose(out, (step if args.weights is None else args.weights) * (x.sum() + 1)):
            wrong += 1
        if step < last:
            backwards += 1
        last = max(last, step)
        if opponents:  # the round's opponent, with weights that say which clone and which step answered
            i = (done + args.first_opponent) % len(opponents)
            try:
                out, step = opponents[i](x, batch=True, return_step=True)
            except bray.BrayError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            answers += 1
            wrong += not np.allclose(out, (1000 * (i + 1) + step) * (x.sum() + 1))
            backwards += step < last_of[i]
            last_of[i] = max(last_of[i], step)
    stats = rm.proxy_stats()
    print(json.dumps({"answers": answers, "errors": errors[:5], "n_errors": len(errors), "wrong": wrong,
                      "backwards": backwards, "fallbacks": rm.proxy_fallbacks, "steps": [first, last],
                      "proxy_pid": stats["pid"] if stats else None,
                      "mixed_requests": stats["mixed_requests"] if stats else None}), flush=True)
    for model in (rm, *opponents):
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
