"""Fully connected CRF and Gaussian filtering in PyTorch (permutohedral lattice), CPU and GPU."""

from wsss.crf.dense_crf import DenseCRF, dense_crf, dense_crf_batch, unary_from_labels, unary_from_probs
from wsss.crf.exact import exact_gaussian_filter
from wsss.crf.filters import BilateralFilter, GaussianFilter, bilateral_filter, gaussian_filter
from wsss.crf.lattice import PermutohedralLattice, lattice_filter
from wsss.crf.presets import PRESETS, CRFParams, resolve

__all__ = [
    "PRESETS",
    "BilateralFilter",
    "CRFParams",
    "DenseCRF",
    "GaussianFilter",
    "PermutohedralLattice",
    "bilateral_filter",
    "dense_crf",
    "dense_crf_batch",
    "exact_gaussian_filter",
    "gaussian_filter",
    "lattice_filter",
    "resolve",
    "unary_from_labels",
    "unary_from_probs",
]
