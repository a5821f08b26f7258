"""kdump-capture: save a crashed kernel's memory image to local or network storage."""

__version__ = "0.1.0"
