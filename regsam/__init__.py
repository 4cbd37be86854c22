"""regsam: chest CT registration with self-supervised anatomical embeddings."""

from regsam.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
