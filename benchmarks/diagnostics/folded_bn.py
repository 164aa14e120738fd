"""What inversion loses when an exporter folds batch norm, and what an image prior gives back.

Takes teachers of a zoo (exported with batch norm kept), folds each Conv -> BatchNormalization
pair into the convolution the way torch.onnx does by default, checks the two compute the same
logits, then inverts both from the same fresh generator and latent codes for ``--steps``
Adam steps (FIVE's inner loop, run longer) under four objectives:

- ``kept, CE``: cross-entropy only (the presets' objective);
- ``kept, CE + BN prior``: plus the batch-norm statistics prior at ``--bn-weight``;
- ``folded, CE``: the folded teacher, cross-entropy only (the same function: a check);
- ``folded, CE + BN prior -> TV``: the same FiveConfig as the second row; the folded
  teacher has no batch norm, so FIVE puts total variation at ``--tv-weight``
  (``FiveConfig.tv_weight_without_bn``) in the prior's place.

For each it reports the teacher accuracy of the recovered images (the share the teacher
classifies as their target) and the batch-norm statistics distance of those images measured
on the kept teacher (how far their activations are from the owners' data; lower is closer).

    python benchmarks/diagnostics/folded_bn.py --zoo data-cache/zoo-bench-conv4-30 \
        --teachers 6 --steps 40 --out benchmarks/results/diagnostics/folded-bn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from free_common.inversion.bn_prior import BatchNormPrior
from free_common.inversion.config import AugmentConfig, FiveConfig, GeneratorConfig
from free_common.inversion.five import MetaGenerator, target_labels
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher
from free_common.models.convert import convert
from free_common.models.onnx_static import check_static


def fold_batch_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every BatchNormalization that directly follows a Conv into that Conv's weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {n.output[0]: n for n in graph.node}
    kept_nodes, renames = [], {}
    new_weights: dict[str, np.ndarray] = {}
    for node in graph.node:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv":
            kept_nodes.append(node)
            continue
        scale, shift, mean, var = (weights[name] for name in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        factor = scale / np.sqrt(var + eps)  # (C_out,)
        w = weights[conv.input[1]]
        b = weights[conv.input[2]] if len(conv.input) > 2 else np.zeros(w.shape[0], np.float32)
        new_weights[conv.input[1]] = (w * factor[:, None, None, None]).astype(np.float32)
        bias_name = conv.input[1] + ".folded_bias"
        new_weights[bias_name] = ((b - mean) * factor + shift).astype(np.float32)
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        renames[node.output[0]] = conv.output[0]
    for node in kept_nodes:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    weights.update(new_weights)
    used = {name for n in graph.node for name in n.input}
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items() if k in used)
    return out


def invert(
    teacher: AdaptedTeacher, config: FiveConfig, generator: GeneratorConfig, seed: int
) -> torch.Tensor:
    """Images from a fresh generator adapted `config.adapt_steps` times to `teacher`."""
    meta = MetaGenerator(build_generator(generator, seed, torch.device("cpu")), config)
    recovery, _ = meta.adapt(teacher, torch.Generator().manual_seed(seed))
    return recovery.images


def score(
    teacher: AdaptedTeacher, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Teacher accuracy on `images`, and their batch-norm statistics distance on `teacher`."""
    with torch.no_grad(), BatchNormPrior(teacher) as prior:
        logits = teacher(images)
    return float((logits.argmax(1) == labels).float().mean()), float(prior.loss())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--teachers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--bn-weight", type=float, default=0.05)
    parser.add_argument("--tv-weight", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = FiveConfig(
        adapt_steps=args.steps,
        images_per_class=args.images_per_class,
        augment=AugmentConfig(crop_padding=0, flip=False),
    )
    settings: dict[str, tuple[bool, FiveConfig]] = {
        "kept, CE": (False, base),
        "kept, CE + BN prior": (
            False,
            replace(base, bn_weight=args.bn_weight, tv_weight_without_bn=args.tv_weight),
        ),
        "folded, CE": (True, base),
        "folded, CE + BN prior -> TV": (
            True,
            replace(base, bn_weight=args.bn_weight, tv_weight_without_bn=args.tv_weight),
        ),
    }
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    started = time.time()
    for index, path in enumerate(sorted(args.zoo.glob("*.onnx"))[: args.teachers]):
        report = check_static(path.read_bytes())
        kept_module = convert(report.model)
        folded_module = convert(fold_batch_norm(report.model))
        assert not folded_module.batch_norms and kept_module.batch_norms
        task = report.task
        kept = AdaptedTeacher(kept_module, task, path.stem)
        folded = AdaptedTeacher(folded_module, task, path.stem)
        probe = torch.rand(8, *task.input_shape)
        assert torch.allclose(kept(probe), folded(probe), atol=1e-4), "folding changed the logits"
        generator = GeneratorConfig(image_size=task.input_shape[1], channels=task.input_shape[0])
        labels = target_labels(task.num_classes, args.images_per_class, torch.device("cpu"))
        for name, (use_folded, config) in settings.items():
            images = invert(folded if use_folded else kept, config, generator, seed=index)
            rows[name].append(score(kept, images, labels))
        print(path.stem, {n: rows[n][-1] for n in rows}, flush=True)
    summary: dict[str, Any] = {
        name: {
            "teacher_accuracy": statistics.mean(a for a, _ in values),
            "bn_distance": statistics.mean(d for _, d in values),
            "per_teacher": values,
        }
        for name, values in rows.items()
    }
    out = {
        "command": "python benchmarks/diagnostics/folded_bn.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "seconds": round(time.time() - started, 1),
        "settings": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, values in summary.items():
        accuracy, distance = values["teacher_accuracy"], values["bn_distance"]
        print(f"{name:28s} teacher acc {accuracy:.3f}  BN distance {distance:.2f}")


if __name__ == "__main__":
    main()
