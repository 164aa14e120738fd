"""The price of DP-SGD for owners: accuracy, release accuracy and leakage at epsilon 1, 4, 8, none.

For each setting it builds a zoo of `--teachers` Conv4 teachers with group norm
(``conv4gn``: the DP backbone, so "no DP" differs from the others in DP-SGD only) on
the same class draws, then runs `free-bench privacy` on it (one round, the leakage
audit, the loss attacks on teachers and release, the release's meta-test accuracy).
A last row runs the same on the standard batch-norm zoo's first teachers, for the
cost of the architecture change itself. Every figure carries its 95 % interval.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_tradeoff.py \\
        --data data-cache/benchmark --bn-zoo data-cache/zoo-bench-conv4-30 \\
        --out benchmarks/results/privacy
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from free_common.bench.privacy import PrivacyRequest, run_privacy, write_report
from free_common.bench.zoo import ZooConfig, train_zoo
from free_common.data import load_split
from free_common.privacy.audit import AuditConfig
from free_common.privacy.dp import DpConfig


def _zoo(data: Path, folder: Path, teachers: int, epochs: int, epsilon: float | None) -> None:
    if len(list(folder.glob("*.onnx"))) >= teachers:
        return  # a rerun reuses the zoo it built
    dp = None if epsilon is None else DpConfig(epsilon=epsilon)
    config = ZooConfig(teachers, arch="conv4gn" if dp is None else "conv4", epochs=epochs, dp=dp)
    train_zoo(load_split(data, "meta-train"), folder, config)


def _row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    summary = result["summary"]
    accuracy = {f"{r['method']} {r['shots']}-shot": [r["mean"], r["ci95"]]
                for r in result["accuracy"]}  # fmt: skip
    epsilons = [t["dp_epsilon"] for t in result["teachers"] if t["dp_epsilon"] is not None]
    return {
        "setting": name,
        "epsilon_spent": [min(epsilons), max(epsilons)] if epsilons else None,
        "teacher_accuracy": summary["teacher_heldout_accuracy"],
        "recovery_agreement": summary["recovery_agreement"],
        "release_selected_step": result["round"]["selected_step"],
        "meta_test": accuracy,
        "audit_pixel": summary["audit"]["pixel"]["pooled"],
        "audit_feature": summary["audit"].get("feature", {}).get("pooled"),
        "audit_ssim": summary["audit"]["ssim"]["pooled"],
        "attack_teacher": summary["attacks"]["teacher"]["pooled"],
        "attack_release": summary["attacks"]["release"]["pooled"],
        "attack_last_step": summary["attacks"]["last-step"]["pooled"],
        "attack_random_init": summary["attacks"]["random-init"]["pooled"],
        "seconds": result["timings"]["total_seconds"],
    }


def _auc(block: dict[str, Any] | None) -> str:
    if block is None:
        return ""
    return f"{block['auc']:.3f} [{block['auc_ci'][0]:.3f}, {block['auc_ci'][1]:.3f}]"


def _pm(pair: list[float], scale: float = 100.0) -> str:
    return f"{scale * pair[0]:.1f} ± {scale * pair[1]:.1f}"


def _markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# DP-SGD trade-off",
        "",
        f"```\n{doc['command']}\n```",
        "",
        doc["setup"],
        "",
        "| setting | epsilon spent | teacher acc. % | recovered agree % | release step |"
        " release 1-shot % | release 5-shot % | last-step 1-shot % | last-step 5-shot % |"
        " random 1-shot % | random 5-shot % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        spent = row["epsilon_spent"]
        acc = row["meta_test"]
        lines.append(
            f"| {row['setting']} | {'' if spent is None else f'{spent[0]:.2f}-{spent[1]:.2f}'} | "
            f"{_pm(row['teacher_accuracy'])} | {_pm(row['recovery_agreement'])} | "
            f"{row['release_selected_step']} | "
            + " | ".join(
                _pm(acc[f"{model} {shots}-shot"])
                for model in ("release", "last-step", "random-init")
                for shots in (1, 5)
            )
            + " |"
        )
    lines += [
        "",
        "Membership advantage, pooled over the setting's teachers (AUC [bootstrap 95 %]):",
        "",
        "| setting | audit pixel | audit feature | audit SSIM | attack on teacher |"
        " attack on release | attack on last step | attack on random init |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        lines.append(
            f"| {row['setting']} | "
            + " | ".join(
                _auc(row[key])
                for key in (
                    "audit_pixel",
                    "audit_feature",
                    "audit_ssim",
                    "attack_teacher",
                    "attack_release",
                    "attack_last_step",
                    "attack_random_init",
                )
            )
            + " |"
        )
    lines += [
        "",
        *_targets(doc["rows"]),
        "",
        "Each setting's full report: `<setting>/results.md`.",
        "",
    ]
    return "\n".join(lines)


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets at epsilon 8, read off the rows (never written by hand)."""
    by = {row["setting"]: row for row in rows}
    if "epsilon-8" not in by or "no-dp" not in by:
        return []
    dp, plain = by["epsilon-8"], by["no-dp"]
    lines = ["Targets at epsilon 8 against no DP (the same backbone):", ""]
    for model in ("release", "last-step"):
        gap = dp["meta_test"][f"{model} 1-shot"][0] - plain["meta_test"][f"{model} 1-shot"][0]
        lines.append(f"- {model} 1-shot: {100 * gap:+.1f} points (target: within 3)")
    auc = dp["attack_release"]
    lines.append(
        f"- membership attack AUC on the release: {auc['auc']:.3f} "
        f"[{auc['auc_ci'][0]:.3f}, {auc['auc_ci'][1]:.3f}] (target: at most 0.55); on the "
        f"last-step learner {dp['attack_last_step']['auc']:.3f}"
    )
    if dp["release_selected_step"] == 0 and plain["release_selected_step"] == 0:
        lines.append(
            "- both releases are step 0, the random initialization at the scale meta-val chose:"
            " the release targets hold by construction, and the last-step rows are the"
            " informative comparison"
        )
    return lines


def main() -> None:
    """Build the zoos, run the audit on each, write ``tradeoff.json`` and ``tradeoff.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bn-zoo", type=Path, help="a batch-norm Conv4 zoo for the last row")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teachers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--round-steps", type=int, default=12)
    parser.add_argument("--test-episodes", type=int, default=150)
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the tables from OUT/<setting>/"
    )
    args = parser.parse_args()
    if args.report_only:
        _report_only(args)
        return
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    settings: list[tuple[str, Path]] = []
    for epsilon in [*args.epsilons, None]:
        name = "no-dp" if epsilon is None else f"epsilon-{epsilon:g}"
        folder = args.out / "zoos" / name
        _zoo(args.data, folder, args.teachers, args.epochs, epsilon)
        settings.append((name, folder))
    if args.bn_zoo is not None:
        settings.append(("no-dp-batchnorm", args.bn_zoo))
    rows = []
    for name, folder in settings:
        request = PrivacyRequest(args.data, folder, args.out / name, args.teachers, args.preset,
                                 args.round_steps, args.test_episodes)  # fmt: skip
        result = run_privacy(request, AuditConfig(), notify=lambda line: print(line, flush=True))
        write_report(result, args.out / name / "results.md", f"(from {Path(__file__).name})")
        rows.append(_row(name, result))
        print(f"{name}: done", flush=True)
        _write(args, rows, started, load_before)  # what is done survives an interrupted run
    print(f"wrote {args.out / 'tradeoff.md'}")


def _report_only(args: argparse.Namespace) -> None:
    """Rebuild ``tradeoff.json`` and ``.md`` from the settings' ``results.json`` (same setup)."""
    doc = json.loads((args.out / "tradeoff.json").read_text())
    names = [row["setting"] for row in doc["rows"]]
    doc["rows"] = [_row(n, json.loads((args.out / n / "results.json").read_text())) for n in names]
    (args.out / "tradeoff.json").write_text(json.dumps(doc, indent=1))
    (args.out / "tradeoff.md").write_text(_markdown(doc))


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], started: float,
           load_before: float) -> None:  # fmt: skip
    doc = {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "setup": (
            f"{args.teachers} teachers per setting ({args.epochs} epochs; DP: Opacus DP-SGD, "
            f"Adam lr 0.01, clip 1.0, delta 1e-5, Poisson batches of 32, PRV accountant), one "
            f"`{args.preset}` round of {args.round_steps} steps each, release meta-test on "
            f"{args.test_episodes} 5-way episodes per shot count; 1 thread of a 2-core machine "
            f"shared with other work, load average {load_before:.1f} at the start and "
            f"{os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - started:.0f} s in all."
        ),
        "rows": rows,
    }
    (args.out / "tradeoff.json").write_text(json.dumps(doc, indent=1))
    (args.out / "tradeoff.md").write_text(_markdown(doc))


if __name__ == "__main__":
    main()
