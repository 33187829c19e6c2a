"""cfdg: classifier-free diffusion guidance (Ho & Salimans, 2021, arXiv:2207.12598)."""

__version__ = "0.1.0"
