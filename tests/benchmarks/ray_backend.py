"""Benchmark of the Ray backend: its overhead over a local run, and two workers against one.

`.venv/bin/python -m tests.benchmarks.ray_backend` starts a local Ray cluster on loopback (as the
tests do), then times the same `homeiq-trainer train` run (flan-t5-small's dimensions, 200
HomeIQ-shaped examples, 1 epoch) locally and on the cluster, and writes
`tests/benchmarks/RESULTS_RAY.md`. Each configuration runs `--repeats` times, alternating; medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.benchmarks.fixtures import BENCH_EXAMPLES, build_bench_db, build_bench_model  # noqa: E402
from tests.ray_cluster import RayHead  # noqa: E402

RESULTS_MD = Path(__file__).with_name("RESULTS_RAY.md")
# (label, environment): the same run, trained where each says.
CONFIGURATIONS: list[tuple[str, dict[str, str]]] = [
    ("local, 2 threads", {"HOMEIQ_TRAINING__BACKEND": "local", "HOMEIQ_TRAINING__THREADS": "2"}),
    (
        "ray, 1 worker x 2 CPUs",
        {"HOMEIQ_RAY__NUM_WORKERS": "1", "HOMEIQ_RAY__RESOURCES_PER_WORKER": '{"CPU": 2}'},
    ),
    ("ray, 1 worker x 1 CPU", {"HOMEIQ_RAY__NUM_WORKERS": "1", "HOMEIQ_RAY__RESOURCES_PER_WORKER": '{"CPU": 1}'}),
    ("ray, 2 workers x 1 CPU", {"HOMEIQ_RAY__NUM_WORKERS": "2", "HOMEIQ_RAY__RESOURCES_PER_WORKER": '{"CPU": 1}'}),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def one_run(work: Path, model_dir: Path, source_db: Path, head: RayHead, env: dict[str, str]) -> dict[str, Any]:
    """One `homeiq-trainer train` in a fresh directory: wall time, training-loop time, loss."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    full_env = {
        **os.environ,
        "HOMEIQ_TRAINING__BACKEND": "ray",
        "HOMEIQ_TRAINING__BASE_MODEL": str(model_dir),
        "HOMEIQ_TRAINING__EPOCHS": "1",
        "HOMEIQ_DATA__SOURCE_DB": str(source_db),
        "HOMEIQ_DATA__MAX_SAMPLES": os.environ.get("HOMEIQ_DATA__MAX_SAMPLES", str(BENCH_EXAMPLES)),
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(out / "out"),
        "HOMEIQ_STORAGE__HISTORY_DB": str(out / "history.db"),
        "HOMEIQ_RAY__ADDRESS": head.address,
        "HOMEIQ_RAY__AUTH_TOKEN": head.token,
        "HOMEIQ_RAY__CONNECT_TIMEOUT_S": "120",
        **env,
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "homeiq_trainer", "train", "--no-progress"],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {proc.stderr[-3000:]}")
    meta = json.loads((out / "out" / "latest" / "training_run.json").read_text())
    return {"wall_s": wall, "train_s": meta["train_runtime_s"], "final_loss": meta["final_loss"]}


def render(results: dict[str, list[dict[str, Any]]], load_before: str, load_after: str, wall_s: float) -> str:
    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    lines = [
        "| configuration | wall (process start → exit), s | training loop, s | final loss |",
        "| --- | --- | --- | --- |",
    ]
    for label, runs in results.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        loops = ", ".join(f"{r['train_s']:.1f}" for r in runs)
        lines.append(
            f"| {label} | {median(label, 'wall_s'):.1f} ({walls}) | {median(label, 'train_s'):.1f} ({loops}) "
            f"| {median(label, 'final_loss'):.2f} |"
        )
    local, ray2, ray1, ray2w = (label for label, _ in CONFIGURATIONS)
    overhead = median(ray2, "wall_s") - median(local, "wall_s")
    loop_ratio = median(ray2, "train_s") / median(local, "train_s")
    # Everything but the training loop: start, data, connecting, starting workers, loading the model.
    fixed_local = median(local, "wall_s") - median(local, "train_s")
    fixed_ray = median(ray2, "wall_s") - median(ray2, "train_s")
    scaling = median(ray1, "train_s") / median(ray2w, "train_s")
    return (
        "# Ray backend benchmark\n\n"
        f"Command: `.venv/bin/python -m tests.benchmarks.ray_backend` ({wall_s / 60:.1f} minutes). Load average "
        f"before: {load_before}; after: {load_after}. One local Ray head (2 CPUs) on the same machine, on loopback.\n"
        "Run: `homeiq-trainer train`, flan-t5-small's dimensions (random weights), "
        f"{os.environ.get('HOMEIQ_DATA__MAX_SAMPLES', BENCH_EXAMPLES)} HomeIQ-shaped examples, 1 epoch, batch 8. "
        "Medians (each run in brackets).\n\n" + "\n".join(lines) + "\n\n"
        f"- Overhead of Ray, same compute (1 worker x 2 CPUs vs local 2 threads): {overhead:+.1f} s of wall time "
        f"per run; training loop {loop_ratio:.2f}x the local one; the rest of the run (wall minus loop: "
        f"start, data, connecting, starting the workers, loading the model) {fixed_ray:.1f} s against "
        f"{fixed_local:.1f} s locally ({fixed_ray - fixed_local:+.1f} s).\n"
        f"- Scaling, 2 workers x 1 CPU vs 1 worker x 1 CPU (training loop): {scaling:.2f}x the speed of one worker.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--examples", type=int, default=BENCH_EXAMPLES, help="fewer for a quick look on a busy machine")
    args = parser.parse_args()
    os.environ["HOMEIQ_DATA__MAX_SAMPLES"] = str(args.examples)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in CONFIGURATIONS}
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="homeiq-ray-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        model_dir = build_bench_model(work / "model")
        source_db = build_bench_db(work)
        head = RayHead(num_cpus=2)
        stack.callback(head.stop)
        log("starting a local Ray head")
        head.start()
        for repeat in range(args.repeats):
            for label, env in CONFIGURATIONS:
                log(f"{label}, run {repeat + 1}/{args.repeats}")
                results[label].append(one_run(work, model_dir, source_db, head, env))
                log(f"  {results[label][-1]}")
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(results, load_before, load_after, time.monotonic() - started)
    print(text)
    RESULTS_MD.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
