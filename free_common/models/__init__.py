"""Models: backbones, ONNX export, and intake of untrusted ONNX teachers.

- `backbones`: Conv4, ResNet-10/18, MLP and `build_backbone` (teachers and meta-learner).
- `export`, `checkpoint`, `metadata`: torch to ONNX with BatchNorm kept, safetensors
  weights, task metadata in ``metadata_props``.
- `onnx_static`, `intake`, `intake_worker`, `convert`: static checks on the bytes, full
  intake in a bounded worker process, and the conversion to a frozen torch module
  (`intake.load_teacher` is what the engine calls).
"""
