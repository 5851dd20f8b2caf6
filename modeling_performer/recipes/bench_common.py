"""What the benchmark scripts share: where results go, how each point runs in a fresh process,
and the record every result file carries (settings, date, commit).

Results go to outputs/bench/<name>.json (and the figure beside it) unless `--update-figures`
asks for the committed docs/figures/<name>.json, or `--output` names a file: a run with partial
options never overwrites the figures the README cites.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys


from . import ROOT

FIGURES = ROOT / "docs" / "figures"
RESULTS = ROOT / "outputs" / "bench"
# Measuring processes keep freed memory (glibc would otherwise return and re-fault it every step).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def add_output_arguments(parser, name: str):
    parser.add_argument("--output", type=pathlib.Path,
                        help=f"where the results go (default: outputs/bench/{name}.json; the figure is written "
                             "next to it, with .png)")
    parser.add_argument("--update-figures", action="store_true",
                        help=f"write the committed docs/figures/{name}.json and its figure (the README's numbers)")


def results_path(args, name: str) -> pathlib.Path:
    if args.output is not None:
        return pathlib.Path(args.output)
    return (FIGURES if args.update_figures else RESULTS) / f"{name}.json"


def add_model_arguments(parser, name: str, worker_args: int):
    """The model shape every benchmark takes, where its results go, --replot and the hidden
    --worker switch (each point runs in a fresh process)."""
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--window", type=int, default=64, help="local window of the Hedgehog + window model")
    parser.add_argument("--vocab", type=int, default=8000)
    add_output_arguments(parser, name)
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the results file")
    parser.add_argument("--worker", nargs=worker_args, help=argparse.SUPPRESS)


def measure_in_process(script: str, worker_args, abort_on_error: bool = False) -> dict:
    """Runs `script` with this command line plus --worker ARGS in a fresh process; its last line of
    output is one JSON result. A point that fails (out of memory: the process is killed) gives
    {"error": ...} and the benchmark goes on with the others (or stops with the worker's error
    output, with abort_on_error)."""
    cmd = [sys.executable, script, *sys.argv[1:], "--worker", *map(str, worker_args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode:
        if abort_on_error:
            raise SystemExit(done.stderr)
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1:]
        return {"error": f"exit {done.returncode}: {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB ("VmRSS:", "VmHWM:"); 0 where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def synchronize(device):
    """Waits for a CUDA device's queued work (timings on an accelerator); nothing elsewhere.
    device: a torch.device or its name."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def handled_without_measuring(name: str, args, worker) -> bool:
    """The two runs of a benchmark script that measure nothing here: a --worker process measures
    one point; --replot redraws the figure from the results file. Returns True when one of them ran."""
    if args.worker:
        worker(args)
        return True
    if args.replot:
        from .plots import redraw

        print(f"wrote {redraw(name, results_path(args, name))}")
        return True
    return False


def provenance() -> dict:
    """When and from which commit a result was measured (the commit is 'unknown' outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit + ("+changes" if dirty else "")}


def save_and_draw(name: str, args, payload: dict) -> pathlib.Path:
    """Writes {"settings", "date", "commit", **payload} to the results file and draws the figure beside it."""
    path = results_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "replot", "worker", "update_figures")}
    path.write_text(json.dumps({"settings": settings, **provenance(), **payload}, indent=1, default=str))
    from .plots import redraw

    print(f"wrote {path} and {redraw(name, path)}")
    return path
