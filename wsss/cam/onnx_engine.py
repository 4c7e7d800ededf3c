"""CAM inference through ONNX Runtime (CPU): the trained network is exported once, for any batch and size.

On this project's 2-core CPU, ONNX Runtime runs the EfficientNet-Lite0 CAM network about 1.7x faster
than eager PyTorch at equal threads (benchmarks/bench_cam.py), with outputs equal to ~1e-5.
Optional: `pip install onnxruntime onnx` (pinned in requirements/lock.txt). GPUs keep the torch engine.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from wsss.cam.infer import CamFn


class _CamOutput(nn.Module):
    """A module around a CAM function, so that the exporter sees one tensor in and one out."""

    def __init__(self, net: nn.Module, cam_fn: CamFn):
        super().__init__()
        self.net, self.cam_fn = net, cam_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_fn(x)


def onnx_cam_fn(net: nn.Module, cam_fn: CamFn, threads: int, example_size: int = 96) -> CamFn:
    """Export `cam_fn` (net's CAM output) to ONNX with dynamic batch/height/width; (N, 3, h, w) -> (N, K, h', w')."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError("cam_infer.engine=onnxruntime needs ONNX Runtime: pip install onnxruntime onnx") from e
    module = _CamOutput(net, cam_fn).eval()
    example = torch.zeros(1, 3, example_size, example_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: sizes stay symbolic (checked by tests)
        torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["cams"], opset_version=17,
                          dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "cams": {0: "n", 2: "fh", 3: "fw"}},
                          dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        cams = session.run(None, {"images": x.detach().float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(cams).to(x.device)

    return run
