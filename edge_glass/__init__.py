"""Edge Glass: small multimodal models on modest hardware.

    import edge_glass
    model = edge_glass.load("runs/quickstart")
    model.encode_images(["photo.jpg"], dim=128), model.encode_texts(["a cat"], dim=128)
"""
__version__ = "0.1.0"


def load(run_dir, device=None):
    """Load a trained run directory on ``device`` (default: CUDA if available); see edge_glass.api.load."""
    from .api import load as _load

    return _load(run_dir, device)


def export_run(run_dir, out, format="onnx", dim=None, int8=False, merge=False, threads=None):
    """Export a run (onnx | sentence-transformers | hf | peft); see edge_glass.api.export.
    (Not ``edge_glass.export``: that name is the subpackage holding the exporters.)"""
    from .api import export as _export

    return _export(run_dir, out, format, dim, int8, merge, threads)


def from_pretrained(path, device=None):
    """Load a save_pretrained directory; see edge_glass.api.from_pretrained."""
    from .api import from_pretrained as _from_pretrained

    return _from_pretrained(path, device)


__all__ = ["load", "export_run", "from_pretrained", "__version__"]
