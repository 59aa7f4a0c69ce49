"""Export formats for the bare student: safetensors, ONNX, TensorRT; parity; benchmarks."""
