"""edgecap: image captioning for the edge (train in PyTorch, export to ONNX, run anywhere)."""

__version__ = "0.1.0"
