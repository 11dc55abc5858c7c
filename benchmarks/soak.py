"""A long run of the edge runtime that must hold: `gemel run` serving four streams (synthetic,
and a video file looping) under the merged policy for `--minutes` (default 30), its metrics
scraped from /metrics.json every second. Prints one JSON object.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--fps 30] [--budget 50%] [--bundle BUNDLE]
                                        [--samples FILE.jsonl] [--threads N|default ...]

Bundle: as benchmarks/runtime.py builds one by default (the quick-start workload with every
proposed share group tied, not retrained), or `--bundle` (a bundle `gemel export` wrote).
Streams: stream i runs model i mod the number of models; streams 0 and 2 are synthetic at
`--fps`, streams 1 and 3 read one small MJPG video (written here with OpenCV, at `--fps`)
looping. Budget: benchmarks/runtime.py's budgets (`largest`, `50%`, `75%`), `all` (every
model apart: nothing needs evicting) or a number of bytes.

`gemel run` runs as a subprocess with `--metrics-port 0` (the port is read from its standard
error) and `--duration`, so it ends on its own and prints its summary. Every second this script
reads /metrics.json; a scrape that fails (no answer within 5 s, not HTTP 200, not JSON) is
counted and the scraping goes on.

Figures:
- `rss`: the process's resident memory (the snapshot's `process_rss_bytes`) every 10 s of the
  run, and its least-squares slope per hour over the samples after the first minute, in bytes
  and as a % of the first sample after that minute (the warm-up: allocators, kernels and first
  loads, is left out);
- `per_minute`: for every whole minute of the run, frames arrived, processed and dropped
  (differences of the counters between the scrapes nearest to the minute's ends) and the
  processed fraction;
- `per_minute` also has the models' swaps, bytes loaded, runs (frames through a model), seconds
  of inference and of loading in that minute, and inference per run (`infer_ms_per_run`): a
  minute that processed less with more swaps lost time to loading, one with the same swaps and
  a higher `infer_ms_per_run` ran the same work slower;
- `per_minute` also says where the box's CPU went in that minute (from /proc/stat and the run's
  own CPU time): `run_cpu` (cores the `gemel run` process used), `other_cpu` (cores every other
  process used), `steal` (cores the hypervisor gave to other machines) and `idle`, so that a
  minute that processed less can be told apart: the runtime slower, or the box taken;
- `bar`: the issue's bars, each passed or not: the slope under 1% of the start value per
  hour, no scrape failed, every minute's processed fraction within 5 points of the run's.

`--samples` writes every scrape (full resolution) as one JSON line each (with several
`--threads`, every soak's scrapes in turn: the `t` of each starts again at 0).

`--threads` passes `gemel run --threads N`; with several values (`--threads default 1`) the
soaks run one after the other on the same bundle, and the JSON has each one's report under
`runs` and the figures to compare (processed fraction, worst minute, the run's cores and the
inference time per run, minute by minute) under `side_by_side`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from analyze import device_name  # noqa: E402
from runtime import budgets_for, build_tied_bundle  # noqa: E402

from gemel_studio.runtime import load_bundle  # noqa: E402

METRICS_LINE = re.compile(r"metrics: (http://\S+)/metrics \(Prometheus\)")
SLOPE_BAR_PERCENT_PER_HOUR = 1.0
MINUTE_BAR_POINTS = 5.0


def write_video(path: Path, fps: float, frames: int = 90, size=(64, 64)) -> Path:
    """A small MJPG clip (a bright square moving over a gradient), as the tests write theirs."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {path} (MJPG)")
    w, h = size
    for i in range(frames):
        image = np.zeros((h, w, 3), np.uint8)
        image[:, :, 0] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
        x, y = (3 * i) % (w - 16), (2 * i) % (h - 16)
        image[y:y + 16, x:x + 16] = 255
        writer.write(image)
    writer.release()
    return path


def fitted_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (units per second) of (seconds, value) points."""
    if len(points) < 2:
        return None
    t = np.array([p[0] for p in points], dtype=float)
    v = np.array([p[1] for p in points], dtype=float)
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, v, 1)[0])


def _exits_soon(proc: subprocess.Popen, within_s: float = 30.0) -> bool:
    try:
        proc.wait(timeout=within_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def box_cpu() -> dict:
    """The box's CPU seconds so far (all cores): busy, idle and stolen (Linux /proc/stat; {} elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return {}
    ticks = [int(v) for v in fields] + [0] * 8
    hz = float(os.sysconf("SC_CLK_TCK"))  # USER_HZ, the unit of /proc/stat
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
    return {"busy_s": (user + nice + system + irq + softirq) / hz, "idle_s": (idle + iowait) / hz,
            "steal_s": steal / hz}


def cpu_sample(process: psutil.Process | None) -> dict:
    """Box CPU counters and the run process's own CPU seconds, for per-minute shares."""
    out = box_cpu()
    if process is not None:
        try:
            times = process.cpu_times()
            out["run_s"] = times.user + times.system
        except psutil.Error:
            pass
    return out


def totals(snap: dict) -> dict:
    """The run's counters so far: frames (all streams), and the models' swaps, bytes loaded,
    runs (frames through a model) and seconds of inference and of loading (all models)."""
    streams, models = snap["streams"], snap.get("models", {}).values()
    out = {key: sum(s[key] for s in streams) for key in ("frames_in", "processed", "dropped")}
    for key in ("swaps", "loaded_bytes", "runs", "infer_seconds", "load_seconds"):
        out[key] = sum(m.get(key) or 0 for m in models)
    return out


def per_minute(samples: list[dict], minutes: int) -> list[dict]:
    """Counter differences between the scrapes nearest to each whole minute's ends."""
    out = []
    for m in range(minutes):
        lo, hi = 60.0 * m, 60.0 * (m + 1)
        if not samples or samples[-1]["elapsed_s"] < hi - 1.5:  # the run did not reach this minute's end
            break
        a = min(samples, key=lambda s: abs(s["elapsed_s"] - lo)) if m else None
        b = min(samples, key=lambda s: abs(s["elapsed_s"] - hi))
        row = {"minute": m + 1, "from_s": round(a["elapsed_s"], 2) if a else 0.0, "to_s": round(b["elapsed_s"], 2)}
        for key in ("frames_in", "processed", "dropped", "swaps", "loaded_bytes", "runs"):
            row[key] = b[key] - (a[key] if a else 0)
        row["processed_fraction"] = round(row["processed"] / row["frames_in"], 4) if row["frames_in"] else None
        # Inference per frame through a model rises in a minute where the same work took longer
        # (the box slower); loading rises with the schedule (more swaps).
        infer = b["infer_seconds"] - (a["infer_seconds"] if a else 0.0)
        row["infer_s"] = round(infer, 2)
        row["load_s"] = round(b["load_seconds"] - (a["load_seconds"] if a else 0.0), 2)
        row["infer_ms_per_run"] = round(1000.0 * infer / row["runs"], 2) if row["runs"] else None
        c = a or samples[0]  # CPU counters: the first minute's from the first scrape
        span = b["t"] - c["t"]
        if span > 0 and all(k in c.get("cpu", {}) and k in b.get("cpu", {}) for k in ("busy_s", "run_s")):
            d = {k: b["cpu"][k] - c["cpu"][k] for k in c["cpu"] if k in b["cpu"]}
            row["cores"] = {"run_cpu": round(d["run_s"] / span, 2), "other_cpu": round((d["busy_s"] - d["run_s"]) / span, 2),
                            "steal": round(d.get("steal_s", 0.0) / span, 2), "idle": round(d.get("idle_s", 0.0) / span, 2)}
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate of every stream (default 30)")
    parser.add_argument("--budget", default="50%", help="largest, 50%%, 75%%, all or bytes (default 50%%)")
    parser.add_argument("--bundle", type=Path, help="a bundle from `gemel export` (default: build the tied "
                        "quick-start bundle, as benchmarks/runtime.py does)")
    parser.add_argument("--workload", type=Path, default=ROOT / "sample_workloads" / "quickstart.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=Path, help="write every scrape to this file, one JSON line each")
    parser.add_argument("--threads", nargs="+", default=["default"], metavar="N|default",
                        help="`gemel run --threads N` (CPU threads one inference may use; default: not given, "
                        "torch's own); several values run one soak each, in turn, reported side by side")
    parser.add_argument("--note", action="append", default=[], help="a note to carry in the JSON (repeatable)")
    args = parser.parse_args()
    if not args.minutes > 0:
        parser.error(f"--minutes {args.minutes}: must be positive")
    threads = []
    for value in args.threads:
        if value != "default" and not (value.isdigit() and int(value) > 0):
            parser.error(f"--threads {value}: a positive number or 'default'")
        threads.append(None if value == "default" else int(value))

    print(f"device: {device_name()}", file=sys.stderr, flush=True)
    if args.samples:
        args.samples.write_text("")
    reports = [soak(args, n) for n in threads]
    if len(reports) == 1:
        print(json.dumps(reports[0], indent=1))
        return
    keys = ("threads", "processed_fraction", "worst_minute_gap_points", "scrape_errors")
    side = [{**{k: r[k] for k in keys}, "rss_slope_percent_per_hour": r["rss"]["slope_percent_per_hour"],
             "run_cores": [m["cores"]["run_cpu"] for m in r["per_minute"] if "cores" in m],
             "infer_ms_per_run": [m["infer_ms_per_run"] for m in r["per_minute"]], "passed": r["bar"]["passed"]}
            for r in reports]
    print(json.dumps({"benchmark": "soak", "device": reports[0]["device"], "compare": "threads",
                      "side_by_side": side, "runs": reports}, indent=1))


def soak(args, threads: int | None) -> dict:
    """One soak of `gemel run` (`threads`: its --threads, None for not given); its report."""
    duration_s = 60.0 * args.minutes
    with tempfile.TemporaryDirectory(prefix="gemel-bench-soak-") as tmp:
        tmp = Path(tmp)
        bundle_path = args.bundle or build_tied_bundle(args.workload, tmp)
        with load_bundle(bundle_path) as bundle:
            names = [m.name for m in bundle.manifest.models]
            sizes = budgets_for(bundle, names[:4])
        if args.budget in sizes["budgets"]:
            budget = sizes["budgets"][args.budget]
        elif args.budget == "all":
            budget = sizes["all_apart_bytes"]
        else:
            budget = int(args.budget)
        video = write_video(tmp / "loop.avi", args.fps)
        stream_specs = [f"{f'synthetic:{args.fps:g}' if i % 2 == 0 else video}={names[i % len(names)]}"
                        for i in range(4)]
        command = [sys.executable, "-m", "gemel_studio.cli", "run", str(bundle_path), "--policy", "merged",
                   "--memory-budget", str(budget), "--device", args.device, "--loop", "--metrics-port", "0",
                   "--duration", f"{duration_s:g}", "--json"] + ([] if threads is None else ["--threads", str(threads)])
        for spec in stream_specs:
            command += ["--stream", spec]
        print("running: " + " ".join(command), file=sys.stderr, flush=True)
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        url: list[str] = []
        stderr_lines: list[str] = []
        found = threading.Event()

        def read_stderr():
            for line in proc.stderr:
                stderr_lines.append(line.rstrip("\n"))
                match = METRICS_LINE.search(line)
                if match and not url:
                    url.append(match.group(1) + "/metrics.json")
                    found.set()
            found.set()  # the process ended without a metrics line

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        stdout_box: list[str] = []
        out_reader = threading.Thread(target=lambda: stdout_box.append(proc.stdout.read()), daemon=True)
        out_reader.start()
        found.wait(timeout=600)
        if not url:
            proc.kill()
            raise SystemExit("gemel run printed no metrics address:\n" + "\n".join(stderr_lines[-20:]))

        samples: list[dict] = []
        errors: list[str] = []
        try:
            run_process = psutil.Process(proc.pid)
        except psutil.Error:
            run_process = None
        sink = args.samples.open("a") if args.samples else None  # emptied once, in main()
        started = time.monotonic()
        tick = 0
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(url[0], timeout=5) as response:
                    if response.status != 200:
                        raise OSError(f"HTTP {response.status}")
                    snap = json.loads(response.read())
                sample = {"t": round(time.monotonic() - started, 3), "elapsed_s": snap["elapsed_s"],
                          "state": snap["state"], "rss": snap["memory"].get("process_rss_bytes"), **totals(snap),
                          "cpu": cpu_sample(run_process)}
                samples.append(sample)
                if sink:
                    sink.write(json.dumps(sample) + "\n")
            except Exception as exc:  # noqa: BLE001 - every failed scrape counts, whatever failed
                # Past its duration the run closes its metrics port, then prints its summary and
                # exits: a refused scrape then is the end, not a failure.
                ending = bool(samples) and samples[-1]["elapsed_s"] >= duration_s - 2.0
                if proc.poll() is not None or (ending and _exits_soon(proc)):
                    break
                errors.append(f"{time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}")
            tick += 1
            time.sleep(max(0.0, started + tick - time.monotonic()))
        proc.wait()
        out_reader.join(timeout=30)
        reader.join(timeout=30)
        if sink:
            sink.close()
        try:
            summary = json.loads(stdout_box[0]) if stdout_box else None
        except json.JSONDecodeError:
            summary = None
        if proc.returncode != 0 or summary is None:
            raise SystemExit(f"gemel run exited with {proc.returncode}:\n" + "\n".join(stderr_lines[-20:]))

    running = [s for s in samples if s["state"] == "running" and s["rss"] is not None]
    after = [s for s in running if s["elapsed_s"] >= 60.0]
    slope = fitted_slope([(s["elapsed_s"], s["rss"]) for s in after])
    start_rss = after[0]["rss"] if after else None
    slope_pct = 100.0 * slope * 3600.0 / start_rss if slope is not None and start_rss else None
    # The same fit over the second half only: a warm-up that lasts minutes (allocator pools
    # growing to their working size) shows as a slope above that falls here; a leak does not.
    half = [s for s in running if s["elapsed_s"] >= duration_s / 2]
    half_slope = fitted_slope([(s["elapsed_s"], s["rss"]) for s in half])
    half_pct = 100.0 * half_slope * 3600.0 / half[0]["rss"] if half_slope is not None and half[0]["rss"] else None
    frames_in = sum(s["frames_in"] for s in summary["streams"])
    processed = sum(s["processed"] for s in summary["streams"])
    fraction = processed / frames_in if frames_in else None
    minutes = per_minute(running, int(args.minutes))
    worst_gap = max((abs(m["processed_fraction"] - fraction) * 100.0 for m in minutes
                     if m["processed_fraction"] is not None), default=None) if fraction is not None else None
    every10, last_bucket = [], None  # the first scrape of every 10 s, and the last one
    for i, s in enumerate(running):
        if int(s["elapsed_s"] // 10) != last_bucket or i == len(running) - 1:
            every10.append([round(s["elapsed_s"], 1), s["rss"]])
            last_bucket = int(s["elapsed_s"] // 10)
    report = {
        "benchmark": "soak", "device": device_name() if args.device == "cpu" else args.device,
        "bundle": str(args.bundle) if args.bundle else f"{args.workload}, every proposed group tied (built here, "
        "not retrained)",
        "policy": "merged", "budget": args.budget, "budget_bytes": budget, **sizes, "streams": stream_specs,
        "fps": args.fps, "minutes": args.minutes, "command": command,
        "threads": summary.get("threads"),  # what the run used (its --threads, else torch's own)
        "stopped": summary["stopped"], "elapsed_s": round(summary["elapsed_s"], 1),
        "frames_in": frames_in, "processed": processed, "dropped": frames_in - processed,
        "processed_fraction": round(fraction, 4) if fraction is not None else None,
        "scrapes": len(samples), "scrape_errors": len(errors), "scrape_error_examples": errors[:10],
        "rss": {"start_bytes": running[0]["rss"] if running else None, "after_first_minute_bytes": start_rss,
                "end_bytes": running[-1]["rss"] if running else None,
                "max_bytes": max((s["rss"] for s in running), default=None),
                "slope_bytes_per_hour": round(slope * 3600.0) if slope is not None else None,
                "slope_percent_per_hour": round(slope_pct, 3) if slope_pct is not None else None,
                "fitted_over": f"{len(after)} scrapes after the first minute",
                "second_half_slope_percent_per_hour": round(half_pct, 3) if half_pct is not None else None,
                "every_10s": every10},
        "per_minute": minutes,
        "worst_minute_gap_points": round(worst_gap, 2) if worst_gap is not None else None,
        "bar": {
            f"rss slope under {SLOPE_BAR_PERCENT_PER_HOUR:g}%/h after the first minute":
                slope_pct is not None and slope_pct < SLOPE_BAR_PERCENT_PER_HOUR,
            "no scrape failed": not errors and bool(samples),
            f"every minute within {MINUTE_BAR_POINTS:g} points of the run's processed fraction":
                worst_gap is not None and worst_gap <= MINUTE_BAR_POINTS,
        },
        "notes": args.note,
    }
    report["bar"]["passed"] = all(report["bar"].values())
    return report


if __name__ == "__main__":
    main()
