"""fdcache: extract a CLIP teacher's feature maps once, train many FD students fast."""

__version__ = "0.1.0"
