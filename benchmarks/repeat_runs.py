"""Does a repeat run land inside the first run's 95% interval? Coverage of the timing intervals.

Runs a campaign (by default the quickstart) ``--runs`` times, each a fresh
``edgefarm quickstart --fresh`` (a new local farm, every trial re-measured) sharing one
home (so prepared artifacts are reused), then, for every configuration and every pair of
consecutive runs, checks whether the later run's p50 lies inside the earlier run's

- 95% repeat-run interval (what tables show as ``±x%``; ``TrialInterval.repeat_half``:
  both runs' trial noise and the run-level noise ``edgefarm.domain.RUN_NOISE_SD``),
- 95% confidence interval of the typical value (``TrialInterval.mean_half``, for reference:
  it describes one run's trials only, so it covers a repeat run less often than 95%),

and prints one line per configuration and pair, then the coverage of each and its
estimate of the run-level noise on this machine (the figure ``RUN_NOISE_SD`` comes from).
``--rejudge FILE`` re-reads the runs a previous ``--json`` named (their homes must still
exist) without measuring again. Run it on a
quiet machine: anything else running makes the runs differ for reasons the intervals do
not describe (and the busy-host guard may reject trials).

    python benchmarks/repeat_runs.py --runs 6
    python benchmarks/repeat_runs.py --runs 2 --tiny   # a smoke test of the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefarm.domain import RUN_NOISE_SD, trial_interval  # noqa: E402
from edgefarm.home import default_store_url  # noqa: E402
from results.store import ResultsStore  # noqa: E402

QUICKSTART = ROOT / "campaigns" / "quickstart.yaml"
TINY_SPEC = """name: repeat-tiny
models:
  - name: digits-mlp
    source: builtin:digits-mlp
    backends: [onnxruntime]
backends:
  - name: onnxruntime
    schemes: [fp32, int8-dynamic]
measurement:
  warmup_iterations: 5
  min_iterations: 50
  min_duration_s: 0.1
  trials: 3
  threads: 1
  timeout_s: 60
"""

Key = tuple[str, str, str]
KEPT = ("ok", "valid", "lat_p50_ms", "trial_medians_ms")  # what --json keeps of each row


def run_once(spec: Path, home: Path, index: int) -> str:
    """One fresh campaign run in a new local farm; the campaign id it stored."""
    edgefarm = Path(sys.executable).parent / "edgefarm"
    command = [str(edgefarm), "quickstart", "--fresh", "--spec", str(spec), "--home", str(home)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"run {index + 1} failed (exit {proc.returncode}):\n{tail}")
    with ResultsStore.open(default_store_url(home)) as store:
        campaign_id = store.list_campaigns(limit=1)[0].campaign_id
    print(f"run {index + 1}: {campaign_id} in {time.perf_counter() - started:.0f} s", flush=True)
    return campaign_id


def rows_by_key(home: Path, campaign_id: str) -> dict[Key, dict[str, Any]]:
    """The campaign's measured rows by (model, backend, scheme)."""
    with ResultsStore.open(default_store_url(home)) as store:
        rows = store.results_for_campaign(campaign_id)
    return {(str(r["model"]), str(r["backend"]), str(r["scheme"])): r for r in rows}


def inside(row: dict[str, Any], later: float, repeat: bool) -> bool | None:
    """Whether ``later`` lies in ``row``'s interval around its p50 (None: no interval)."""
    interval = trial_interval(row.get("trial_medians_ms") or [])
    p50 = row.get("lat_p50_ms")
    if interval is None or p50 is None:
        return None
    low, high = interval.bounds(float(p50), repeat=repeat)
    return low <= later <= high


def coverage(runs: list[dict[Key, dict[str, Any]]]) -> dict[str, Any]:
    """Per pair of consecutive runs and configuration: the check; then the coverage."""
    lines: list[dict[str, Any]] = []
    for n, (first, second) in enumerate(itertools.pairwise(runs)):
        for key, row in first.items():
            other = second.get(key)
            if other is None or not (row.get("ok") and other.get("ok")):
                continue
            if row.get("lat_p50_ms") is None or other.get("lat_p50_ms") is None:
                continue
            interval = trial_interval(row.get("trial_medians_ms") or [])
            later = float(other["lat_p50_ms"])
            lines.append(
                {
                    "pair": f"{n + 1}->{n + 2}",
                    "config": "/".join(key),
                    "p50_ms": float(row["lat_p50_ms"]),
                    "trials": len(row.get("trial_medians_ms") or []),
                    "repeat_pm_pct": interval.repeat_percent if interval else None,
                    "ci_pm_pct": (interval.bounds(1.0, repeat=False)[1] - 1) * 100
                    if interval
                    else None,
                    "next_p50_ms": later,
                    "change_pct": (later / float(row["lat_p50_ms"]) - 1) * 100,
                    "valid": bool(row.get("valid") and other.get("valid")),
                    "in_repeat": inside(row, later, repeat=True),
                    "in_ci": inside(row, later, repeat=False),
                }
            )
    judged = [x for x in lines if x["in_repeat"] is not None]
    return {
        "pairs": lines,
        "judged": len(judged),
        "run_noise_sd_pct": run_noise_estimate(runs),
        "repeat_coverage": sum(bool(x["in_repeat"]) for x in judged) / len(judged)
        if judged
        else None,
        "ci_coverage": sum(bool(x["in_ci"]) for x in judged) / len(judged) if judged else None,
    }


def run_noise_estimate(runs: list[dict[Key, dict[str, Any]]]) -> float | None:
    """The run-level noise (log-scale sd of one run's p50, in %) that the trials do not
    show: half the mean squared log change between consecutive runs, less what the trial
    spread of both runs explains (``2 s^2 / n``), over every configuration."""
    excess: list[float] = []
    for first, second in itertools.pairwise(runs):
        for key, row in first.items():
            other = second.get(key)
            if other is None or not (row.get("ok") and other.get("ok")):
                continue
            a, b = row.get("trial_medians_ms") or [], other.get("trial_medians_ms") or []
            p, q = row.get("lat_p50_ms"), other.get("lat_p50_ms")
            ia, ib = trial_interval(a, run_noise=0.0), trial_interval(b, run_noise=0.0)
            if ia is None or ib is None or not p or not q:
                continue
            within = ia.log_sd**2 / ia.trials + ib.log_sd**2 / ib.trials
            excess.append(math.log(float(q) / float(p)) ** 2 - within)
    if not excess:
        return None
    return math.sqrt(max(statistics.fmean(excess), 0.0) / 2) * 100


def print_report(result: dict[str, Any]) -> None:
    """The per-pair lines and the coverage figures."""
    head = (
        f"{'pair':<6} {'configuration':<40} {'p50 ms':>10} {'±repeat':>8} {'±CI':>7} "
        f"{'next p50':>10} {'change':>7}  in repeat  in CI  valid"
    )
    print(head)
    for x in result["pairs"]:
        repeat = f"{x['repeat_pm_pct']:.1f}%" if x["repeat_pm_pct"] is not None else "-"
        ci = f"{x['ci_pm_pct']:.1f}%" if x["ci_pm_pct"] is not None else "-"
        print(
            f"{x['pair']:<6} {x['config']:<40} {x['p50_ms']:>10.4f} {repeat:>8} {ci:>7} "
            f"{x['next_p50_ms']:>10.4f} {x['change_pct']:>+6.1f}%  "
            f"{_yes(x['in_repeat']):>9}  {_yes(x['in_ci']):>5}  {_yes(x['valid']):>5}"
        )
    if result["judged"]:
        print(
            f"\ncoverage over {result['judged']} configuration-pairs: repeat-run interval "
            f"{result['repeat_coverage']:.1%}, confidence interval of the mean "
            f"{result['ci_coverage']:.1%}"
        )
        noise = result["run_noise_sd_pct"]
        if noise is not None:
            print(
                f"run-level noise beyond the trials on this machine: {noise:.2f}% "
                f"(the intervals assume {RUN_NOISE_SD * 100:.2f}%: edgefarm.domain.RUN_NOISE_SD)"
            )
    else:
        print("\nno pair with an interval (every row needs at least two trials)")


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def main(argv: list[str] | None = None) -> int:
    """Run the campaign repeatedly and print the coverage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh runs (at least 2)")
    parser.add_argument("--spec", type=Path, default=QUICKSTART, help="campaign to repeat")
    parser.add_argument("--tiny", action="store_true", help="a tiny digits-only campaign")
    parser.add_argument("--home", type=Path, help="edgefarm home to use (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the figures (and the runs) here")
    parser.add_argument("--rejudge", type=Path, help="judge the runs of an earlier --json again")
    args = parser.parse_args(argv)
    if args.rejudge is not None:
        runs = [
            {tuple(key.split("/")): row for key, row in run.items()}
            for run in json.loads(args.rejudge.read_text(encoding="utf-8"))["runs"]
        ]
    else:
        if args.runs < 2:
            parser.error("--runs must be at least 2")
        runs = measure(args.runs, args.spec, args.tiny, args.home)
    result = coverage(runs)  # type: ignore[arg-type]
    print()
    print_report(result)
    if args.json:
        result["runs"] = [{"/".join(key): row for key, row in run.items()} for run in runs]
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def measure(count: int, spec: Path, tiny: bool, home: Path | None) -> list[dict[Key, Any]]:
    """``count`` fresh runs of the campaign; the figures of each run's rows."""
    with tempfile.TemporaryDirectory(prefix="edgefarm-repeat-") as tmp:
        home = home or Path(tmp)
        if tiny:
            spec = home / "repeat-tiny.yaml"
            home.mkdir(parents=True, exist_ok=True)
            spec.write_text(TINY_SPEC, encoding="utf-8")
        ids = [run_once(spec, home, i) for i in range(count)]
        return [
            {key: {k: row.get(k) for k in KEPT} for key, row in rows_by_key(home, c).items()}
            for c in ids
        ]


if __name__ == "__main__":
    sys.exit(main())
