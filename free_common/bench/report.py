"""results.md: the table people read, written from the results.json document."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["METHOD_TITLES", "render_markdown"]

METHOD_TITLES = {
    "free": "FREE (FIVE + BELL with iGA)",
    "free-no-iga": "FREE without iGA",
    "scratch": "scratch inversion + BELL",
    "distill": "distillation on FIVE's images, no meta-learning",
    "average": "weight averaging",
    "random": "random initialization",
}


def _cell(rows: Sequence[dict[str, Any]], method: str, shots: int) -> str:
    for row in rows:
        if row["method"] == method and row["shots"] == shots:
            return f"{100 * row['mean']:.2f} ± {100 * row['ci95']:.2f}"
    return "–"


def _accuracy_table(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    shots = sorted({int(row["shots"]) for row in rows})
    lines = [
        "| method | " + " | ".join(f"{s}-shot" for s in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for method in methods:
        if any(row["method"] == method for row in rows):
            cells = " | ".join(_cell(rows, method, s) for s in shots)
            lines.append(f"| {METHOD_TITLES.get(method, method)} | {cells} |")
    return lines


def _row(rows: Sequence[dict[str, Any]], method: str, shots: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["shots"] == shots), None)


def _gap(
    rows: Sequence[dict[str, Any]], method: str, other: str, shots: int
) -> tuple[float, float] | None:
    """(mean gap, larger 95% half-width) in points between two methods, or None."""
    mine, theirs = _row(rows, method, shots), _row(rows, other, shots)
    if mine is None or theirs is None:
        return None
    return 100 * (mine["mean"] - theirs["mean"]), 100 * max(mine["ci95"], theirs["ci95"])


def _beats(rows: Sequence[dict[str, Any]], method: str, other: str, shots: int) -> str:
    """'met' when `method` is above `other` by more than the larger 95% interval."""
    found = _gap(rows, method, other, shots)
    if found is None:
        return "not measured"
    gap, margin = found
    return f"{_verdict(gap > margin)} ({gap:+.2f} points, needs > {margin:.2f})"


def _level(rows: Sequence[dict[str, Any]], method: str, other: str, shots: int) -> str:
    """'met' when `method` is not below `other` by more than the larger 95% interval."""
    found = _gap(rows, method, other, shots)
    if found is None:
        return "not measured"
    gap, margin = found
    return f"{_verdict(gap >= -margin)} ({gap:+.2f} points, within -{margin:.2f})"


def _targets(results: dict[str, Any]) -> list[str]:
    recovery, rows = results["recovery"], results["accuracy"]
    speedup = recovery["speedup"]
    lines = [
        "- recovery at least 30x faster than scratch inversion: "
        + (
            "not measured (scratch not run)"
            if speedup is None
            else f"{_verdict(speedup >= 30)} ({speedup:.1f}x)"
        ),
        f"- FIVE teacher accuracy (cross-entropy alone) at least 0.90: "
        f"{_verdict(recovery['free_teacher_accuracy'] >= 0.90)} "
        f"({recovery['free_teacher_accuracy']:.2f})",
    ]
    baselines = [m for m in ("average", "scratch", "distill", "random") if m in results["methods"]]
    for shots in (1, 5):
        for other in baselines:
            lines.append(
                f"- {shots}-shot, FREE above {METHOD_TITLES[other]}: "
                f"{_beats(rows, 'free', other, shots)}"
            )
        lines.append(
            f"- {shots}-shot, FREE at least level with FREE without iGA: "
            f"{_level(rows, 'free', 'free-no-iga', shots)}; above it: "
            f"{_beats(rows, 'free', 'free-no-iga', shots)}"
        )
    curve = [mean for _step, mean in results["curves"].get("free", [])]
    if curve:
        drop = 100 * (max(curve) - curve[-1])
        lines.append(
            f"- FREE meta-val curve: last point within 1.5 points of its best: "
            f"{_verdict(drop <= 1.5)} ({drop:.2f} below)"
        )
    if results["preset"] != "cpu":
        lines.append(
            f"- (the accuracy targets are set for preset cpu; this is {results['preset']})"
        )
    return lines


def _start(results: dict[str, Any]) -> list[str]:
    """Describe the initialization every method starts from, and what averaging averaged."""
    scores = results.get("init_scale_scores") or {}
    lines = ["## The starting point", ""]
    if scores:
        tried = ", ".join(f"x{s}: {100 * v:.2f}" for s, v in scores.items())
        lines.append(
            f"The learner's scale-free weights (those batch norm follows) were tried at "
            f"these scales on meta-val, 1-shot: {tried}. The rounds started from "
            f"x{results['init_scale']['free']:g}, and the random initialization row is that "
            "same start. Fine-tuning at a fixed lr adapts a smaller-norm network faster "
            "(`docs/engine-findings.md`)."
        )
    else:
        lines.append("One initial scale was configured; nothing was chosen.")
    selected = results.get("selected_steps") or {}
    if selected:
        steps = ", ".join(f"{METHOD_TITLES.get(m, m)} {s}" for m, s in selected.items())
        lines.append(f"Steps meta-val selected: {steps}.")
        at_start = [METHOD_TITLES.get(m, m) for m, s in selected.items() if s == 0]
        if at_start:
            lines.append(
                f"Selected at step 0, so identical to the random initialization row: "
                f"{', '.join(at_start)} (its training never beat its start on meta-val)."
            )
    if "averaged_teachers" in results and "average" in results["methods"]:
        lines.append(
            f"Weight averaging used the {results['averaged_teachers']} teachers of the "
            f"learner's architecture, input and label count out of {results['teachers']['used']}."
        )
    return [*lines, ""]


def _load(environment: dict[str, Any]) -> str:
    load = environment.get("load_average")
    if not load:
        return ""
    return f", load average {load[0]:.1f} at the start and {load[1]:.1f} at the end"


def _teachers(teachers: dict[str, Any]) -> str:
    text = f"{teachers['used']} used of {teachers['count']}"
    if teachers.get("loaded", teachers["count"]) < teachers["count"]:
        text += f" (the preset takes the first {teachers['loaded']} by name)"
    return text


def _recovery_row(what: str, seconds: float, accuracy: float) -> str:
    return f"| {what} | {seconds:.3f} | {accuracy:.3f} |"


def _scratch_row(recovery: dict[str, Any]) -> str:
    if recovery["speedup"] is None:
        return "| scratch: not run (--skip scratch) | – | – |"
    return _recovery_row(
        f"scratch: {recovery['scratch_steps']} steps from a fresh generator",
        recovery["scratch_seconds_per_teacher"],
        recovery["scratch_teacher_accuracy"],
    )


def _speedup(recovery: dict[str, Any]) -> str:
    if recovery["speedup"] is None:
        return "Speed-up of FIVE over scratch inversion: not measured, scratch was not run "
    return f"Speed-up of FIVE over scratch inversion: **{recovery['speedup']:.1f}x** "


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def render_markdown(results: dict[str, Any]) -> str:
    """Render results.json as markdown: accuracy, recovery, cross-domain, targets, pictures."""
    methods = results["methods"]
    recovery = results["recovery"]
    test_rows = results["accuracy"]
    episodes = test_rows[0]["episodes"] if test_rows else 0
    lines = [
        f"# FREE benchmark, preset `{results['preset']}`",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Device: {results['device']}; torch {results['environment']['torch']}, "
        f"{results['environment']['threads']} threads{_load(results['environment'])}. "
        f"Data: `{results['data']['dir']}` "
        f"({results['data']['classes']['meta-train']} meta-train / "
        f"{results['data']['classes']['meta-val']} meta-val / "
        f"{results['data']['classes']['meta-test']} meta-test classes). Teachers: "
        f"{_teachers(results['teachers'])} in `{results['zoo']}`. "
        f"Wall time {results['timings']['total_seconds'] / 60:.1f} min.",
        "",
        f"## Meta-test accuracy (%), 5-way, 15 queries, {episodes} episodes, mean ± 95% CI",
        "",
        *_accuracy_table(test_rows, methods),
        "",
        "Every method starts from the same random initialization and is evaluated on the",
        "same episodes: the whole network fine-tuned 10 steps at lr 0.01 on the support set,",
        "batch norm on batch statistics. The meta-learners are trained on 1-shot tasks and",
        "chosen on meta-val (step 0 included); the meta-test split is only read here.",
        "",
        *_start(results),
        "## Recovery, per teacher (same teachers, same batch, this run)",
        "",
        "| recovery | seconds | teacher accuracy |",
        "|---|---|---|",
        _recovery_row(
            f"FIVE: {recovery['free_steps']} steps from the meta-generator, adversarial term on",
            recovery["free_seconds_per_teacher"],
            recovery["free_teacher_accuracy_adv"],
        ),
        _recovery_row(
            f"FIVE: {recovery['free_steps']} steps, cross-entropy alone",
            recovery["free_seconds_per_teacher_ce"],
            recovery["free_teacher_accuracy"],
        ),
        _scratch_row(recovery),
        "",
        _speedup(recovery) + f"({recovery['teachers']} teachers, "
        f"{recovery['images_per_teacher']} images each). "
        f"During training FIVE took {recovery['free_seconds_per_teacher_in_run']:.3f} s per "
        f"teacher with teacher accuracy {recovery['free_teacher_accuracy_in_run']:.3f}. "
        "FIVE is timed after training (median of 3 per teacher), scratch inversion during "
        "its own round: on a machine busy with other work the two can see different loads.",
        "",
    ]
    cross = results["cross_domain"]
    lines += ["## Cross-domain: meta-trained on glyphs, tested on Fashion-MNIST (%)", ""]
    if cross.get("accuracy"):
        lines += [*_accuracy_table(cross["accuracy"], methods), ""]
        lines += [f"{cross['accuracy'][0]['episodes']} episodes; reported, no target yet.", ""]
    else:
        lines += [f"Not run: {cross.get('skipped', 'no data')}", ""]
    if results.get("skipped_methods"):
        lines += ["## Methods not run", ""]
        lines += [f"- {m}: {why}" for m, why in results["skipped_methods"].items()]
        lines.append("")
    lines += ["## Targets (issue 10)", "", *_targets(results), ""]
    lines += ["## Timings (seconds)", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {part} | {sec:.1f} |" for part, sec in results["timings"].items()]
    lines += ["", "## Pictures", ""]
    lines += [f"![{name}]({path})" for name, path in results["figures"].items()]
    return "\n".join(lines) + "\n"
