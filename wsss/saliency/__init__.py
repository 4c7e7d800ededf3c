"""Saliency maps for any data set: the bundled ONNX network, refinement at full resolution, quality metrics."""

from wsss.saliency.metrics import SaliencyMeter, SaliencyResult, evaluate_saliency_folder, score_maps

__all__ = ["SaliencyMeter", "SaliencyResult", "evaluate_saliency_folder", "score_maps"]
