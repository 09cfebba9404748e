"""Time the NestedArray wire codec against plain JSON on one float32 batch.

Each case is one full round trip, encode then decode, as a request body makes it:

- ``bray binary``: :func:`bray.wire.encode` + :func:`bray.wire.decode` (zero-copy views).
- ``json baseline``: ``json.dumps(arr.tolist())`` + ``json.loads`` + ``np.asarray(float32)``.
- ``bray json``: the same JSON text, read back the way the handler reads a JSON body
  (:func:`bray.handlers.request.parse_payload` against the model's spec) and written with
  :func:`bray.wire.to_jsonable`.

Usage::

    .venv/bin/python scripts/bench_wire.py              # Markdown table
    .venv/bin/python scripts/bench_wire.py --json       # one JSON object
    .venv/bin/python scripts/bench_wire.py --shape 256,64 --repeat 9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import timeit
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from bray import wire


@dataclass(frozen=True)
class Result:
    """One timed case: median and spread of ``repeat`` runs, in microseconds per call."""

    case: str
    median_us: float
    min_us: float
    max_us: float
    body_bytes: int
    calls_per_run: int
    repeat: int


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float, float, int]:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # enough calls for a run of >= 0.2 s
    per_call = [t / number * 1e6 for t in timer.repeat(repeat=repeat, number=number)]
    return statistics.median(per_call), min(per_call), max(per_call), number


def bench_wire(shape: tuple[int, ...] = (64, 64), *, repeat: int = 7, seed: int = 0) -> list[Result]:
    """Time encode+decode of one float32 array of ``shape`` with each codec.

    Args:
        shape: The batch shape.
        repeat: Timed runs per case; the median is reported.
        seed: Seed for the random batch.

    Returns:
        One :class:`Result` per case, the JSON baseline second.

    Raises:
        AssertionError: A codec did not give the batch back (a broken benchmark, not
            a timing).
    """
    arr = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def binary() -> np.ndarray:
        return wire.decode(wire.encode(arr))

    def json_baseline() -> np.ndarray:
        return np.asarray(json.loads(json.dumps(arr.tolist())), dtype=np.float32)

    from bray import tree
    from bray.export import LeafSpec, ModelSpec
    from bray.handlers.request import parse_payload

    leaf = LeafSpec("float32", tuple(arr.shape[1:]))
    spec = ModelSpec(inputs=tree.flatten(((arr,), {}))[1], input_leaves=(leaf,), outputs=tree.LEAF,
                     output_leaves=(leaf,), param_names=(), has_torch=False, has_onnx=False)

    def bray_json() -> object:
        return parse_payload(json.loads(json.dumps(wire.to_jsonable(arr))), spec, binary=False).leaves[0]

    cases = {
        "bray binary (encode+decode)": (binary, len(wire.encode(arr))),
        "json baseline (dumps+loads+asarray)": (json_baseline, len(json.dumps(arr.tolist()))),
        "bray json (to_jsonable / handler's parse_payload)": (bray_json, len(json.dumps(wire.to_jsonable(arr)))),
    }
    results = []
    for name, (fn, body) in cases.items():
        got = fn()
        if not np.array_equal(got, arr):
            raise AssertionError(f"{name} did not round-trip the batch")
        median, low, high, number = _time(fn, repeat)
        results.append(Result(name, median, low, high, body, number, repeat))
    return results


def render_markdown(results: Sequence[Result], baseline: str) -> str:
    """A Markdown table with each case's median and its ratio to ``baseline``.

    Args:
        results: The timed cases.
        baseline: The case name the ratio divides by.

    Returns:
        The table, one line per case.
    """
    base = next(r.median_us for r in results if r.case == baseline)
    lines = [
        "| case | median µs | min–max µs | body bytes | × json baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {r.median_us:.1f} | {r.min_us:.1f}–{r.max_us:.1f} | "
            f"{r.body_bytes} | {r.median_us / base:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table (or JSON with ``--json``).

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--shape", default="64,64", help="batch shape, comma-separated (default 64,64)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (default 7)")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(d) for d in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be integers separated by commas, got {args.shape!r}")
    if args.repeat < 1:
        parser.error(f"--repeat must be an integer >= 1, got {args.repeat}")

    results = bench_wire(shape, repeat=args.repeat)
    baseline = results[1].case
    if args.json:
        print(json.dumps({
            "shape": list(shape),
            "dtype": "float32",
            "baseline": baseline,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "results": [
                {**asdict(r), "ratio_to_baseline": r.median_us / results[1].median_us}
                for r in results
            ],
        }, indent=2))
    else:
        print(f"wire round trip of one float32{list(shape)} batch, median of {args.repeat} runs\n")
        print(render_markdown(results, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
