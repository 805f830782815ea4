"""Networks over a flat parameter vector: ``build(spec)`` and the layers."""

from .network import Network, build

__all__ = ["Network", "build"]
