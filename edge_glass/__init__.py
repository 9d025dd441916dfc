"""Edge Glass: small multimodal models on modest hardware.

    import edge_glass
    model = edge_glass.load("runs/quickstart")
    model.encode_images(["photo.jpg"], dim=128), model.encode_texts(["a cat"], dim=128)
"""
__version__ = "0.1.0"


def load(run_dir):
    """Load a trained run directory; see edge_glass.api.AlignedModel."""
    from .api import load as _load

    return _load(run_dir)


__all__ = ["load", "__version__"]
