"""Models: backbones, ONNX export helpers and untrusted-ONNX intake."""
