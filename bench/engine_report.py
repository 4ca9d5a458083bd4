"""The short summary of a ``bench/gpu_suite.sh`` run: each stage's status, then the key figures
of whatever results it wrote (a missing or broken file is reported, never fatal).

    python bench/engine_report.py OUT_DIR
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from bench.engine_bench import print_report


def _load(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"- {path.name}: not available ({exc.__class__.__name__})")
        return None


def stages(out: pathlib.Path) -> None:
    print("| stage | exit | seconds |")
    print("|---|---:|---:|")
    try:
        lines = (out / "stages.tsv").read_text().splitlines()
    except OSError:
        print("| (no stages.tsv) | | |")
        return
    for line in lines:
        name, status, seconds = (line.split("\t") + ["", ""])[:3]
        flag = "" if status == "0" else " FAILED" if status != "124" else " TIMED OUT"
        print(f"| {name}{flag} | {status} | {seconds} |")


def correctness(report: dict[str, Any], name: str) -> None:
    gaps = [m["top2_gap"] for m in report["mismatches"]]
    print(
        f"{name}: {report['exact_sequences']}/{report['sequences']} sequences exact, token match "
        f"{report['token_match_rate']:.1%}, {len(gaps)} divergences"
        + (f" (HF top-2 gap there: max {max(gaps):.4f})" if gaps else "")
        + f"; graphs {report['graphs']}, compiled kernels {report['compiled_kernels']}"
    )
    vision = report.get("vision")
    if vision:
        for key, err in vision.items():
            if isinstance(err, dict):
                print(
                    f"  vision {key}: max abs {err['max_abs']:.3g}, rel L2 {err['rel_l2']:.3g}, "
                    f"min cosine {err['min_cosine']:.6f}"
                )


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    stages(out)
    sections = [
        ("correctness_2b.json", lambda r: correctness(r, "correctness_2b")),
        ("engine_bench.json", print_report),
        ("e2e/e2e.json", e2e),
        ("graphs.json", graphs),
    ]
    for name, show in sections:
        report = _load(out / name)
        if report is None:
            continue
        try:
            show(report)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            print(f"- {name}: incomplete ({exc!r})")


def graphs(report: dict[str, Any]) -> None:
    for name, r in report.items():
        print(
            f"graphs vs eager ({name}): identical {r['identical']}, match {r['match_rate']:.1%}, "
            f"logprob max diff {r['logprob_max_diff']:.3g}, first divergences "
            f"{r['first_divergence'] or 'none'}"
        )


def e2e(report: dict[str, Any]) -> None:
    util = report.get("gpu_util_mean_pct")
    print(
        f"e2e: {report['image_req_s']:.1f} image req/s (today {report['today_req_s']:g}, "
        f"floor {report['floor_req_s']:g}), p50 {report['latency_p50_s'] * 1e3:.0f} ms, p99 "
        f"{report['latency_p99_s'] * 1e3:.0f} ms, errors {report['errors']}, GPU util "
        f"{'n/a' if util is None else f'{util:.0f} %'}, per server {report['requests_per_server']}"
    )


if __name__ == "__main__":
    main()
