"""CAM inference through ONNX Runtime equals the torch engine (dynamic batch and image size)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from wsss.config import BackboneConfig, load_recipe
from wsss.models.cam_net import CAMNet
from wsss.stages.cam import cam_function

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("backbone", ["test_resnet", "tf_efficientnet_lite0"])  # lite0: TF "same" padding
def test_onnxruntime_cams_equal_torch_cams_at_other_sizes(backbone: str):
    torch.manual_seed(0)
    net = CAMNet(OmegaConf.structured(BackboneConfig(name=backbone, weights="none", output_stride=16)), 3).eval()
    method = SimpleNamespace(net=net, cams=lambda x, output: net(x)["cams"], channels_last=False)
    ort_fn = cam_function(method, "cam", "onnxruntime")  # exported at 96 x 96
    torch_fn = cam_function(method, "cam", "torch")
    for shape in [(1, 3, 64, 80), (3, 3, 120, 90)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            expected = torch_fn(x)
        got = ort_fn(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()) + 1e-5)


def test_unknown_engine_is_a_config_error():
    from wsss.config import ConfigError

    with pytest.raises(ConfigError, match="cam_infer.engine"):
        load_recipe("configs/shapes_cam.yaml", ["cam_infer.engine=tensorrt"])


def test_onnxruntime_exports_the_seam_pcm_output():
    from wsss.stages.common import cam_method

    overrides = ["cam.backbone.name=test_resnet", "cam.backbone.weights=none"]
    torch.manual_seed(0)
    cfg = load_recipe("configs/shapes_pmm.yaml", overrides)
    method = cam_method(cfg, 4).eval()
    ort_fn = cam_function(method, cfg.cam_infer.output, "onnxruntime")
    x = torch.randn(2, 3, 72, 88)
    with torch.inference_mode():
        expected = cam_function(method, cfg.cam_infer.output)(x)  # cam_rv: the PCM-refined maps
    got = ort_fn(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()) + 1e-5)
