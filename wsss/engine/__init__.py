"""Run directories, the Lightning Trainer, segmentation methods, whole-image inference, weights export
and distributed helpers. The stage runner is wsss/pipeline.py."""
