"""wsss: weakly supervised semantic segmentation, from cheap labels to pixel masks."""

__version__ = "0.1.0"
