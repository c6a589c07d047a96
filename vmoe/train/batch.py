"""Run several training runs one after another inside a time budget, then collect their logs.

    python -m vmoe.train.batch uniform_d768@0 var5_d768@0 --budget-s 585 --data data_large \\
        --results results -- --compile reduce-overhead --no-checkpoints

A run is ``config[:expert_width]@seed`` (``uniform_realised_d768:1240@1``). Each runs as its own
``python -m vmoe.train`` process (a fresh CUDA context and compile cache state per run, as a run
alone would have); arguments after ``--`` go to every run. With ``--budget-s``, a run starts only
if the time left covers the longest run so far (the first run of a fresh machine is the longest:
it fills the compile caches the later ones read): on a machine whose disk does not outlive the
job, a run cut off by the job's limit is lost, so it is better not started; leave the job's own
margin out of the budget. A run that fails or is skipped is reported and the batch goes on; the
exit status is 1 if any run failed. With ``--results DIR``, ``DIR/train_<gpu>.csv`` is rewritten
from every log under ``--out`` (:func:`vmoe.train.loop.collect`) after each run, so that a job
killed mid-run still leaves the finished runs' rows.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from vmoe.train.loop import DEFAULT_OUT, collect
from vmoe.train.model import CONFIGS


def parse_run(spec: str) -> tuple[str, int | None, int]:
    """``config[:expert_width]@seed`` as (config, expert_width or None, seed)."""
    name, at, seed = spec.partition("@")
    config, _, width = name.partition(":")
    if not at or not seed.isdigit():
        raise ValueError(f"run {spec!r}: expected config[:expert_width]@seed, e.g. var5_d768@0")
    if config not in CONFIGS:
        raise ValueError(f"run {spec!r}: unknown config {config!r}")
    if width and not width.isdigit():
        raise ValueError(f"run {spec!r}: expert_width {width!r} is not a whole number")
    return config, int(width) if width else None, int(seed)  # host-ok: strings of the command line


def command(config: str, width: int | None, seed: int, data: Path, out: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "vmoe.train", "--config", config, "--seed", str(seed), "--data", str(data),
           "--out", str(out)]
    if width is not None:
        cmd += ["--expert-width", str(width)]
    return cmd + extra


def fits(elapsed: float, durations: list[float], budget: float | None) -> bool:
    """Whether another run may start: no budget, no run timed yet, or room for the longest so far."""
    if budget is None or not durations:
        return True
    return elapsed + max(durations) <= budget


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="config[:expert_width]@seed")
    parser.add_argument("--budget-s", type=float, help="start no run that would end past this many seconds")
    parser.add_argument("--data", type=Path, default=Path("data"), help="corpus folder (default data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="runs folder (default results/runs)")
    parser.add_argument("--results", type=Path, help="rewrite train_<gpu>.csv here after each run")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    try:
        runs = [parse_run(spec) for spec in args.runs]
    except ValueError as e:
        parser.error(str(e))
    started, durations, failed = time.monotonic(), [], []
    for spec, (config, width, seed) in zip(args.runs, runs):
        elapsed = time.monotonic() - started
        if not fits(elapsed, durations, args.budget_s):
            print(f"batch: {spec} skipped ({elapsed:.0f} s used; the longest run took {max(durations):.0f} s "
                  f"of a {args.budget_s:.0f} s budget)", flush=True)
            continue
        t0 = time.monotonic()
        rc = subprocess.call(command(config, width, seed, args.data, args.out, extra))
        durations.append(time.monotonic() - t0)
        print(f"batch: {spec} exited {rc} after {durations[-1]:.0f} s", flush=True)
        if rc:
            failed.append(spec)
        if args.results is not None:
            df = collect(args.out, args.results)
            print(f"batch: {len(df)} rows -> {args.results}/train_<gpu>.csv", flush=True)
    if failed:
        print(f"batch: failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
