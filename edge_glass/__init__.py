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


__all__ = ["load", "__version__"]
