"""robkit: distil self-supervised vision teachers into small students that ship in mobile apps."""

__version__ = "0.1.0"
