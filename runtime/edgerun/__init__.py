"""edgerun: the on-device runtime. Loads a verified bundle and serves it; never imports torch."""

__version__ = "0.1.0"
