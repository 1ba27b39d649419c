"""tooti: a decentralized AI inference network on trio."""

__version__ = "0.1.0"
