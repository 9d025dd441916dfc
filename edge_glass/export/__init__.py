"""Taking a trained run out of Edge Glass: ONNX / TorchScript towers for ``edge_glass.runtime``
(onnx.py) and standard model formats other tools load (formats.py)."""
