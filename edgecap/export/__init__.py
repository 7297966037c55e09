"""Export: checkpoint -> verified ONNX model folder (fp32, fp16, int8)."""
