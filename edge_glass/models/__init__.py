from .alignment import AlignmentModel

__all__ = ["AlignmentModel"]
