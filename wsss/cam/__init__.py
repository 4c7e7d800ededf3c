"""CAM inference (multi-scale + flip, multi-crop), storage and smoothing."""
