"""`free-bench privacy`: what a round's recovered images and its release reveal of owners' data.

On a zoo whose training images are known (`free-bench zoo` records them), one round
runs over the zoo's first teachers; then, for each teacher:

- the leakage audit (`free_common.privacy.audit`): a batch recovered from it by the
  round's carried meta-generator, against its training images and its held-out images
  of the same classes, in pixels, in the release's penultimate features and in SSIM;
- the loss attack (`free_common.privacy.membership`) on the teacher itself (the upper
  bound: the operator holds the model) and on the round's release, scored through the
  prototype head an owner's adaptation starts from; the same on the round's learner
  after its last step (the release when meta-val selects the last step; on this data it
  often selects step 0, the random initialization) and on a random initialization at
  the release's scale, the no-information reference.

Optionally the meta-test accuracy of those three initializations (5-way 1- and
5-shot, the protocol of `free-bench run`). Output: ``results.json``, ``results.md``,
``figures/*.png`` (the worst teachers' recovered images beside their nearest training
images) and the round under ``work/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from free_common.bench.figures import recovery_sheet
from free_common.bench.measure import EpisodeSet, evaluate_models
from free_common.bench.run import load_zoo, random_at_scale
from free_common.bench.zoo import training_split
from free_common.data import EpisodeSampler, ImageSet, load_split, to_tensor
from free_common.engine import carried_state, finished_round, preset, run_round
from free_common.engine.config import EngineConfig
from free_common.errors import ConfigError
from free_common.inversion.teacher import AdaptedTeacher
from free_common.privacy.audit import METRICS, AuditConfig, OwnerImages, audit_teacher
from free_common.privacy.membership import ATTACK, batch_features, model_scores, release_scores
from free_common.privacy.metrics import advantage, mean_ci95

__all__ = ["PrivacyRequest", "owner_images", "run_privacy", "summarize", "write_report"]

_QUERIES = 15
_REUSED = ", run by an earlier call with the same --out and read back"
_WORST = 3
"""Teachers drawn in the pictures: those whose pixel audit AUC is highest."""


@dataclass(frozen=True)
class PrivacyRequest:
    """One `free-bench privacy` run.

    Attributes
    ----------
    data, zoo, out
        Glyph set folder, teacher zoo (with its training records), output folder.
    teachers
        Zoo teachers (the first by name) the round runs over and the audit measures.
    preset
        Engine preset of the round.
    round_steps
        Steps of the round (None: the preset's).
    test_episodes
        Meta-test episodes per shot count for the release's accuracy (0: not measured).
    seed
        Seeds the round's config, the audit and the bootstrap.
    """

    data: Path
    zoo: Path
    out: Path
    teachers: int = 24
    preset: str = "cpu"
    round_steps: int | None = 24
    test_episodes: int = 0
    seed: int = 0


def owner_images(data: ImageSet, record: dict[str, Any]) -> OwnerImages:
    """Return zoo teacher `record`'s training and held-out images, labels in its logit order."""
    train_idx, held_idx = training_split(data, record)
    position = {int(label): k for k, label in enumerate(record["classes"])}

    def labels(indices: np.ndarray) -> Tensor:
        return torch.tensor([position[int(v)] for v in data.labels[indices]])

    return OwnerImages(
        members=to_tensor(data.images[train_idx]),
        member_labels=labels(train_idx),
        nonmembers=to_tensor(data.images[held_idx]),
        nonmember_labels=labels(held_idx),
    )


def _round_config(request: PrivacyRequest, data: ImageSet) -> EngineConfig:
    config = preset(request.preset).for_input(data.channels, data.image_size[0])
    config = dataclasses.replace(config, seed=config.seed + request.seed)
    if request.round_steps is not None:
        warmup = min(config.warmup_steps, max(1, request.round_steps // 3))
        config = dataclasses.replace(config, steps=request.round_steps, warmup_steps=warmup)
    return config


def run_privacy(
    request: PrivacyRequest, audit: AuditConfig, notify: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the round, audit and attack every teacher, write ``results.json``; return it."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    torch.manual_seed(request.seed)
    if request.teachers < 1:
        raise ConfigError(f"--teachers must be at least 1, got {request.teachers}")
    splits = {name: load_split(request.data, name) for name in ("meta-train", "meta-val")}
    train = splits["meta-train"]
    config = _round_config(request, train)
    zoo = load_zoo(request.zoo, request.teachers)
    records = [json.loads((request.zoo / f"{z.teacher.teacher_id}.json").read_text()) for z in zoo]
    owners = [owner_images(train, record) for record in records]  # fails early on a bad zoo
    teachers = [z.teacher for z in zoo]
    side = train.image_size[0]
    validation = EpisodeSet(
        EpisodeSampler(
            splits["meta-val"],
            config.learner.ways,
            config.validation.shots,
            config.validation.queries,
            config.seed,
        ),
        config.validation.episodes,
        train.channels,
        side,
    )
    workdir = request.out / "work" / "round"
    # A rerun with the same --out audits the round it already ran.
    result = finished_round(teachers, config, workdir, device="cpu")
    reused = result is not None
    if result is None:
        result = run_round(teachers, config, workdir, validation=validation, device="cpu",
                           fresh=True)  # fmt: skip
    state = carried_state(config, workdir, "cpu")
    assert state is not None
    round_seconds = result.seconds  # the round's own wall time, also when read back
    notify(
        f"round over {len(teachers)} teachers: {round_seconds:.0f} s"
        f"{' (an earlier run, read back)' if reused else ''}, release = step "
        f"{result.selected_step} of {config.steps}"
    )
    release = result.initialization.build_model()
    random = random_at_scale(config, result.init_scale)
    # Meta-val often selects step 0 on this data (docs/engine-findings.md section 7): the
    # release is then the random initialization, so the learner after the round's last
    # step is attacked and scored too, as what a release trained on these teachers reveals.
    inits = {"release": release, "last-step": result.learner.cpu(), "random-init": random}
    features = {name: batch_features(model) for name, model in inits.items()}
    rows = []
    audits = []
    clock = time.perf_counter()
    for zoo_teacher, record, owner in zip(zoo, records, owners, strict=True):
        teacher = zoo_teacher.teacher
        adapted = AdaptedTeacher(teacher.module, teacher.task, teacher.teacher_id)
        found = audit_teacher(adapted, state.meta_generator, owner, audit, features["release"])
        attacks = {"teacher": model_scores(adapted, owner)}
        attacks.update({name: release_scores(f, owner) for name, f in features.items()})
        rows.append(
            {
                "teacher": teacher.teacher_id,
                "arch": record.get("arch"),
                "heldout_accuracy": record.get("heldout_accuracy"),
                "dp_epsilon": record.get("dp_epsilon"),
                "members": len(owner.members),
                "nonmembers": len(owner.nonmembers),
                "recovery_agreement": found.recovery_agreement,
                "audit": found.summary(),
                "attacks": {
                    name: dataclasses.asdict(
                        advantage(*scores, resamples=audit.resamples, seed=audit.seed)
                    )
                    for name, scores in attacks.items()
                },
                "audit_seconds": round(found.seconds, 2),
            }
        )
        audits.append((found, attacks))
        pixel = found.metrics["pixel"].advantage
        notify(
            f"{teacher.teacher_id}: recovered {found.recovery_agreement:.0%} agreed, pixel audit "
            f"AUC {pixel.auc:.2f}, loss attack AUC on it "
            f"{rows[-1]['attacks']['teacher']['auc']:.2f}, on the release "
            f"{rows[-1]['attacks']['release']['auc']:.2f}"
        )
    audit_seconds = time.perf_counter() - clock
    figures = _draw(request.out, rows, audits)
    accuracy: list[dict[str, Any]] = []
    clock = time.perf_counter()
    if request.test_episodes:
        # A release of step 0 is the random initialization itself: scored once, as both.
        scored = (
            inits if result.selected_step else {"release": release, "last-step": inits["last-step"]}
        )
        accuracy = _meta_test(request, config, scored)
        if not result.selected_step:
            accuracy += [
                {**row, "method": "random-init"} for row in accuracy if row["method"] == "release"
            ]
    result_doc = {
        "request": {k: str(v) for k, v in dataclasses.asdict(request).items()},
        "audit_config": dataclasses.asdict(audit),
        "attack": ATTACK,
        "round": {
            "preset": config.preset,
            "steps": config.steps,
            "selected_step": result.selected_step,
            "init_scale": result.init_scale,
            "seconds": round(round_seconds, 1),
            "reused": reused,
            "meta_val": [[p.step, p.mean] for p in result.curve],
        },
        "summary": summarize(rows, audits, audit),
        "accuracy": accuracy,
        "timings": {
            "round_seconds": round(round_seconds, 1),
            "audit_and_attacks_seconds": round(audit_seconds, 1),
            "meta_test_seconds": round(time.perf_counter() - clock, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            # The machine was shared: the 1-minute load average at the start and the end.
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "figures": figures,
        "teachers": rows,
    }
    request.out.mkdir(parents=True, exist_ok=True)
    (request.out / "results.json").write_text(json.dumps(result_doc, indent=1, ensure_ascii=False))
    return result_doc


def summarize(
    rows: list[dict[str, Any]],
    audits: list[tuple[Any, dict[str, tuple[np.ndarray, np.ndarray]]]],
    audit: AuditConfig,
) -> dict[str, Any]:
    """Overall figures: pooled scores (one threshold for all owners) and per-teacher means."""
    summary: dict[str, Any] = {"audit": {}, "attacks": {}}
    for name in METRICS:
        measured = [found.metrics[name] for found, _ in audits if name in found.metrics]
        if not measured:
            continue
        pooled = advantage(
            np.concatenate([m.member_scores for m in measured]),
            np.concatenate([m.nonmember_scores for m in measured]),
            audit.resamples,
            audit.seed,
        )
        summary["audit"][name] = {
            "pooled": dataclasses.asdict(pooled),
            "mean_auc": mean_ci95([m.advantage.auc for m in measured]),
            "mean_tpr_at_1fpr": mean_ci95([m.advantage.tpr_at_1fpr for m in measured]),
            "nearest_member": mean_ci95([m.nearest_member for m in measured]),
            "nearest_nonmember": mean_ci95([m.nearest_nonmember for m in measured]),
        }
    for target in ("teacher", "release", "last-step", "random-init"):
        scores = [attacks[target] for _, attacks in audits]
        pooled = advantage(
            np.concatenate([s[0] for s in scores]),
            np.concatenate([s[1] for s in scores]),
            audit.resamples,
            audit.seed,
        )
        per = [row["attacks"][target] for row in rows]
        summary["attacks"][target] = {
            "pooled": dataclasses.asdict(pooled),
            "mean_auc": mean_ci95([p["auc"] for p in per]),
            "mean_tpr_at_1fpr": mean_ci95([p["tpr_at_1fpr"] for p in per]),
        }
    accuracies = [row["heldout_accuracy"] for row in rows if row["heldout_accuracy"] is not None]
    summary["teacher_heldout_accuracy"] = mean_ci95(accuracies)
    summary["recovery_agreement"] = mean_ci95([row["recovery_agreement"] for row in rows])
    return summary


def _meta_test(
    request: PrivacyRequest, config: EngineConfig, models: dict[str, torch.nn.Module]
) -> list[dict[str, Any]]:
    """5-way 1- and 5-shot meta-test accuracy of `models` (the protocol of `free-bench run`)."""
    test = load_split(request.data, "meta-test")
    side = test.image_size[0]
    ways = config.learner.ways

    def episodes(shots: int) -> EpisodeSet:
        sampler = EpisodeSampler(test, ways, shots, _QUERIES, config.seed + 1000 + shots)
        return EpisodeSet(sampler, request.test_episodes, test.channels, side)

    base = dataclasses.replace(config.validation, queries=_QUERIES, episodes=request.test_episodes)
    return evaluate_models(models, episodes, base, (1, 5), "meta-test", torch.device("cpu"))


def _draw(
    out: Path,
    rows: list[dict[str, Any]],
    audits: list[tuple[Any, dict[str, tuple[np.ndarray, np.ndarray]]]],
) -> list[str]:
    """Recovered images beside their nearest training images, for the worst teachers."""
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["audit"]["pixel"]["auc"])
    written = []
    for index in order[:_WORST]:
        found = audits[index][0]
        if not len(found.recovered):
            continue
        pixel = rows[index]["audit"]["pixel"]
        sheet = recovery_sheet(
            f"{found.teacher_id}: pixel audit AUC {pixel['auc']:.2f}",
            [f"pair {k + 1}" for k in range(len(found.recovered))],
            {
                "recovered": [found.recovered[k : k + 1] for k in range(len(found.recovered))],
                "nearest training image": [
                    found.nearest[k : k + 1] for k in range(len(found.nearest))
                ],
            },
            scale=3,
        )
        path = folder / f"nearest-{found.teacher_id}.png"
        sheet.save(path)
        written.append(str(path.relative_to(out)))
    return written


def _ci(pair: list[float] | tuple[float, float], scale: float = 1.0, digits: int = 3) -> str:
    mean, half = pair
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"


def _pooled(block: dict[str, Any]) -> str:
    low, high = block["auc_ci"]
    t_low, t_high = block["tpr_ci"]
    return (
        f"{block['auc']:.3f} [{low:.3f}, {high:.3f}] | "
        f"{block['tpr_at_1fpr']:.3f} [{t_low:.3f}, {t_high:.3f}]"
    )


def write_report(result: dict[str, Any], path: Path, command: str) -> None:
    """Write the markdown report of a `run_privacy` result, with the command that made it."""
    env, summary, rnd = result["environment"], result["summary"], result["round"]
    lines = [
        "# Privacy audit",
        "",
        f"```\n{command}\n```",
        "",
        f"torch {env['torch']}, {env['threads']} thread(s) of {env['cpus']} CPUs shared with "
        f"other work (load average {env['load_average'][0]:.1f} at the start, "
        f"{env['load_average'][1]:.1f} at the end). One `{rnd['preset']}` round of "
        f"{rnd['steps']} steps over {len(result['teachers'])} teachers "
        f"({rnd['seconds']:.0f} s{_REUSED if rnd.get('reused') else ''}); the release is its "
        f"step {rnd['selected_step']} "
        f"(selected on meta-val)"
        + (
            ": step 0 is the random initialization at the chosen scale, so the release "
            "carries nothing of the teachers."
            if rnd["selected_step"] == 0
            else "."
        ),
        f"Audit and attacks: {result['timings']['audit_and_attacks_seconds']:.0f} s.",
        "",
        f"Teacher held-out accuracy {_ci(summary['teacher_heldout_accuracy'], 100, 1)} %, "
        f"recovered images agreed with their target class "
        f"{_ci(summary['recovery_agreement'], 100, 1)} %.",
        "",
        "## Leakage audit (recovered images vs training and held-out images)",
        "",
        "Score of an image: minus its distance to the nearest recovered image of its class. "
        "Pooled: one threshold over all teachers' images, bootstrap 95 % interval; mean: "
        "over teachers, normal 95 % interval.",
        "",
        "| distance | pooled AUC [95 %] | pooled TPR@1%FPR [95 %] | mean AUC | mean TPR@1%FPR |"
        " NN dist. to members | NN dist. to non-members |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, block in summary["audit"].items():
        lines.append(
            f"| {name} | {_pooled(block['pooled'])} | {_ci(block['mean_auc'])} | "
            f"{_ci(block['mean_tpr_at_1fpr'])} | {_ci(block['nearest_member'])} | "
            f"{_ci(block['nearest_nonmember'])} |"
        )
    lines += [
        "",
        f"## Membership inference: {result['attack']}",
        "",
        "| target | pooled AUC [95 %] | pooled TPR@1%FPR [95 %] | mean AUC | mean TPR@1%FPR |",
        "|---|---|---|---|---|",
    ]
    for name, block in summary["attacks"].items():
        lines.append(
            f"| {name} | {_pooled(block['pooled'])} | {_ci(block['mean_auc'])} | "
            f"{_ci(block['mean_tpr_at_1fpr'])} |"
        )
    lines += [
        "",
        "The teacher is scored by its own logits (the operator's view); the release, the "
        "round's learner after its last step (what a release trained on these teachers would "
        "be, when meta-val selects an earlier step) and a random initialization at the "
        "release's scale by the leave-one-out prototype head an owner's adaptation starts "
        "from.",
    ]
    if result["accuracy"]:
        lines += ["", "## Meta-test accuracy (5-way)", "", "| model | shots | accuracy |",
                  "|---|---|---|"]  # fmt: skip
        for row in result["accuracy"]:
            lines.append(
                f"| {row['method']} | {row['shots']} | "
                f"{100 * row['mean']:.2f} ± {100 * row['ci95']:.2f} |"
            )
    lines += ["", "## Per teacher", "",
              "| teacher | acc. | recovered agree | pixel AUC | feature AUC | SSIM AUC |"
              " attack on it | attack on release |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["teachers"]:
        audit = row["audit"]

        def auc(name: str, audit: dict[str, Any] = audit) -> str:
            return f"{audit[name]['auc']:.2f}" if name in audit else ""

        lines.append(
            f"| {row['teacher']} | {row['heldout_accuracy']:.2f} | "
            f"{row['recovery_agreement']:.2f} | {auc('pixel')} | {auc('feature')} | "
            f"{auc('ssim')} | {row['attacks']['teacher']['auc']:.2f} | "
            f"{row['attacks']['release']['auc']:.2f} |"
        )
    if result["figures"]:
        lines += ["", "## Pictures", ""]
        lines += [f"![{name}]({name})" for name in result["figures"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
