"""Frozen-encoder feature cache (wsss/engine/feature_cache.py, wsss/data/feature_crops.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import tiny_shapes
from wsss.data.feature_crops import CacheLayout, CachedFeatureSet, crop_origin, crop_padded, default_scales, \
    level_file, view_image
from wsss.data.shapes import ShapesDataset
from wsss.data.transforms import SegmentationSet
from wsss.engine.feature_cache import fill_feature_cache, image_views, probe_levels
from wsss.engine.modules import LossSpec, SmpSegmenter

SIZE = 64


def seg_section(frozen_stages: int = 10, freeze_bn: bool = True, aux_weight: float = 0.0) -> SimpleNamespace:
    encoder = SimpleNamespace(name="test_resnet", weights="none", output_stride=16, frozen_stages=frozen_stages,
                              freeze_bn=freeze_bn, channels_last=False)
    return SimpleNamespace(arch="deeplabv3plus", arch_kwargs={}, encoder=encoder, aux_weight=aux_weight, lr=0.01,
                           new_layer_lr_mult=10.0, momentum=0.9, weight_decay=0.0, poly_power=0.9)


def segmenter(aux_weight: float = 0.0, **kw) -> SmpSegmenter:
    torch.manual_seed(0)
    return SmpSegmenter(seg_section(aux_weight=aux_weight, **kw), 7, [f"c{i}" for i in range(7)], LossSpec("ce"))


@pytest.fixture(scope="module")
def shapes_ds(tmp_path_factory) -> ShapesDataset:
    data = SimpleNamespace(root=str(tmp_path_factory.mktemp("shapes")), image_mode="convert", max_pixels=10**8,
                           skip_bad=False, shapes=SimpleNamespace(num_train=3, num_val=1, image_size=SIZE, seed=0))
    return ShapesDataset.from_config(data, "train")


def layout_of(method: SmpSegmenter, scales=(1.0, 0.5), flips=(False, True)) -> CacheLayout:
    count, levels, strides = probe_levels(method)
    return CacheLayout(count, levels, strides, tuple(scales), tuple(flips))


def test_only_a_wholly_frozen_encoder_is_cacheable():
    assert segmenter().cacheable_encoder() is not None
    assert segmenter(frozen_stages=2).cacheable_encoder() is None  # later stages train
    assert segmenter(freeze_bn=False).cacheable_encoder() is None  # BatchNorm statistics move


def test_probe_finds_the_levels_the_decoder_and_aux_head_read():
    method = segmenter()
    count, levels, strides = probe_levels(method)
    assert count == 6 and levels == (2, 5) and strides == (4, 16)  # DeepLabV3+: stride-4 skip + last stage
    aux = segmenter(aux_weight=0.4)
    assert probe_levels(aux)[1] == (2, 4, 5)  # + the aux head's input


def test_cached_features_equal_the_encoder_output(shapes_ds, tmp_path):
    method = segmenter()
    layout = layout_of(method)
    stats = fill_feature_cache(method.cacheable_encoder(), method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout,
                               {}, torch.device("cpu"))
    assert stats["computed"] == 3 and stats["megabytes"] > 0
    image = shapes_ds.load(shapes_ds.ids[1], ("image",))["image"]
    for scale, flipped in layout.views():
        x = method.norm(torch.from_numpy(view_image(image, scale, flipped).transpose(2, 0, 1).copy()).float()[None])
        with torch.no_grad():
            expected = method.cacheable_encoder()(x)
        for level in layout.levels:
            stored = np.load(level_file(tmp_path / shapes_ds.ids[1], scale, flipped, level))
            assert stored.dtype == np.float16 and stored.shape == tuple(expected[level].shape[1:])
            np.testing.assert_allclose(stored.astype(np.float32), expected[level][0].numpy(), rtol=2e-3, atol=2e-3)


def test_training_on_cached_features_gives_the_image_path_loss(shapes_ds, tmp_path):
    """A crop covering the whole unscaled image: the cached features are the encoder's, so are logits and loss."""
    method = segmenter()
    layout = layout_of(method, scales=(1.0,), flips=(False,))
    fill_feature_cache(method.cacheable_encoder(), method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout, {},
                       torch.device("cpu"))
    targets = SegmentationSet(shapes_ds, "gt", augment=None)
    sample = CachedFeatureSet(targets, tmp_path, layout, SIZE, seed=0)[0]
    batch = {k: (v.unsqueeze(0) if torch.is_tensor(v) else [f.unsqueeze(0) for f in v]) for k, v in sample.items()
             if k in ("features", "image", "target")}
    full = shapes_ds.load(shapes_ds.ids[0], ("image", "mask"))
    assert torch.equal(batch["image"][0], torch.from_numpy(full["image"].transpose(2, 0, 1).copy()).float())
    assert torch.equal(batch["target"][0], torch.from_numpy(full["mask"].copy()).long())
    method.eval()  # dropout off: both paths run the same decoder
    x = method.prepare(batch["image"])
    cached_loss, _ = method.loss(x, batch)
    image_loss, _ = method.loss(x, {k: v for k, v in batch.items() if k != "features"})
    assert cached_loss.item() == pytest.approx(image_loss.item(), rel=1e-3)
    cached_loss.backward()
    assert all(p.grad is None for p in method.cacheable_encoder().parameters())  # nothing flows into the encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.model.decoder.parameters())


def test_a_feature_space_crop_matches_the_encoder_on_the_cropped_image():
    """Stride-aligned crops of a big view's features agree with the encoder run on the cropped pixels, up to
    border effects (compared inside a margin), and much better than a crop shifted by one cell."""
    method = segmenter()
    encoder = method.cacheable_encoder()
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 12, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 192 x 192
    to_x = lambda a: method.norm(torch.from_numpy(a.transpose(2, 0, 1).copy()).float()[None])  # noqa: E731
    with torch.no_grad():
        whole = encoder(to_x(smooth))[5][0].numpy()  # stride 16: 12 x 12 cells
        top, left, size = 48, 64, 128
        crop = encoder(to_x(smooth[top : top + size, left : left + size]))[5][0].numpy()  # 8 x 8 cells
    aligned = crop_padded(whole, top // 16, left // 16, size // 16, 0.0)
    shifted = crop_padded(whole, top // 16 + 1, left // 16, size // 16, 0.0)
    inner = (slice(None), slice(2, 6), slice(2, 6))
    err_aligned = np.abs(aligned[inner] - crop[inner]).mean()
    err_shifted = np.abs(shifted[inner] - crop[inner]).mean()
    assert err_aligned < 0.5 * err_shifted


def test_views_of_any_size_share_the_crops_feature_grid():
    """TensorFlow-style "SAME" padding (timm's tf_* encoders) pads odd and even inputs differently: a view
    of odd size, cropped in feature space, must still equal the encoder on the cropped pixels exactly
    (away from the crop's border), as in the image path, whose crops are multiples of the stride."""
    from timm.layers import Conv2dSame

    class SamePadEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = Conv2dSame(3, 4, 3, stride=2), Conv2dSame(4, 4, 3, stride=2)

        def forward(self, x):
            a = self.c1(x)
            return [x, a, self.c2(a)]

    torch.manual_seed(0)
    encoder = SamePadEncoder()
    layout = CacheLayout(3, (2,), (4,), (1.0,), (False,))
    image = np.random.default_rng(0).integers(0, 256, (31, 45, 3), dtype=np.uint8)  # odd sides
    cells = image_views(encoder, lambda x: x / 255.0, image, layout, torch.device("cpu"), False)[(1.0, False, 2)]
    top, left, size = 8, 12, 16
    with torch.no_grad():
        crop = encoder(torch.from_numpy(image[top:top + size, left:left + size].transpose(2, 0, 1).copy()).float()[None]
                       / 255.0)[2][0].numpy()
    cached = crop_padded(cells, top // 4, left // 4, size // 4, 0.0).astype(np.float32)
    np.testing.assert_allclose(cached[:, 1:3, 1:3], crop[:, 1:3, 1:3], atol=2e-3)


def test_crop_geometry():
    assert crop_origin(100, 64, 16, 0.0) == 0 and crop_origin(100, 64, 16, 0.999) == 32  # positions 0, 16, 32
    assert crop_origin(40, 64, 16, 0.7) == 0  # smaller than the crop: origin 0, the rest is padding
    a = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = crop_padded(a, 1, 2, 3, -1.0)
    assert out.tolist() == [[[6, 7, -1], [10, 11, -1], [-1, -1, -1]]]
    assert default_scales((0.5, 1.0)) == (0.5, 0.75, 1.0) and default_scales((1.0, 1.0)) == (1.0,)
    per_channel = crop_padded(np.zeros((2, 1, 1), np.float32), 0, 0, 2, np.array([3.0, 4.0]))
    assert per_channel[0].tolist() == [[0, 3], [3, 3]] and per_channel[1].tolist() == [[0, 4], [4, 4]]


def test_padding_beyond_a_view_is_what_the_image_path_pads_with(shapes_ds, tmp_path):
    """A crop larger than its view: the cells beyond it hold the encoder's features of the image path's black
    padding, away from borders (the view's, and the crop's own, which the image path zero-pads)."""
    method = segmenter()
    encoder = method.cacheable_encoder()
    layout = layout_of(method, scales=(0.5,), flips=(False,))  # the 64 px images become 32 px views
    fill_feature_cache(encoder, method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout, {}, torch.device("cpu"))
    sample = CachedFeatureSet(SegmentationSet(shapes_ds, "gt", augment=None), tmp_path, layout, 128, seed=0)[0]
    padded = sample["image"][None]  # the view at the top left of a black 128 x 128 crop, as PadIfNeeded makes it
    assert padded[0, :, 32:].abs().sum() == 0 and padded[0, :, :32, :32].abs().sum() > 0
    with torch.no_grad():
        expected = encoder(method.norm(padded))[5][0].numpy()  # stride 16: 8 x 8 cells, the view in 2 x 2
    far = (slice(None), slice(3, 6), slice(3, 6))  # cells >= 16 px from the view and from the crop's own border
    cached = sample["features"][5].float().numpy()
    err_cached = np.abs(cached[far] - expected[far]).mean()
    err_zeros = np.abs(expected[far]).mean()
    assert err_cached < 0.1 * err_zeros


def test_samples_align_target_and_features_in_every_view(shapes_ds, tmp_path):
    method = segmenter()
    layout = layout_of(method)
    fill_feature_cache(method.cacheable_encoder(), method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout, {},
                       torch.device("cpu"))
    ds = CachedFeatureSet(SegmentationSet(shapes_ds, "gt", augment=None), tmp_path, layout, 48, seed=3)
    seen = set()
    for _ in range(12):
        s = ds[2]
        assert s["image"].shape == (3, 48, 48) and s["target"].shape == (48, 48) and s["roi"].shape == (48, 48)
        assert s["features"][2].shape[-2:] == (12, 12) and s["features"][5].shape[-2:] == (3, 3)
        assert s["features"][0].numel() == 0  # levels the decoder does not read are not stored
        assert (s["target"][~s["roi"]] == 255).all() and (s["image"][:, ~s["roi"]] == 0).all()
        seen.add((int(s["roi"].sum()), float(s["image"].mean())))
    assert len(seen) > 3  # views and crops vary


def test_fill_resumes_after_an_interruption(shapes_ds, tmp_path, monkeypatch):
    method = segmenter()
    layout = layout_of(method, scales=(1.0,))
    saves = []
    real_save = np.save

    def dying_save(path, array):
        if isinstance(path, (str, Path)):  # a level file (the padding vectors go through a buffer)
            saves.append(path)
        if len(saves) == 6:  # 4 files per image (2 views x 2 levels): the second image, half written
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        fill_feature_cache(method.cacheable_encoder(), method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout, {},
                           torch.device("cpu"))
    monkeypatch.setattr(np, "save", real_save)
    assert (tmp_path / shapes_ds.ids[0]).is_dir() and not (tmp_path / shapes_ds.ids[1]).exists()
    assert list(tmp_path.glob(".tmp-*"))  # the half-written image is only a temporary
    stats = fill_feature_cache(method.cacheable_encoder(), method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout,
                               {}, torch.device("cpu"))
    assert stats["computed"] == 2 and not list(tmp_path.glob(".tmp-*"))
    # a temporary of a live process (another run filling a shared cache root) is left alone
    import socket

    live = tmp_path / f".tmp-{socket.gethostname()}-other-{os.getpid()}"
    live.mkdir()
    fill_feature_cache(method.cacheable_encoder(), method.norm, shapes_ds, shapes_ds.ids, tmp_path, layout, {},
                       torch.device("cpu"))
    assert live.is_dir()
    assert json.loads((tmp_path / "meta.json").read_text())["layout"]["levels"] == [2, 5]


def run_train_seg(tmp_path: Path, *extra: str) -> dict:
    from wsss.pipeline import open_run, run_stages

    overrides = [*tiny_shapes(num_train=6, num_val=2, steps=2, batch=2), "seg.encoder.frozen_stages=10",
                 "seg.encoder.freeze_bn=true", "seg.scale_range=[0.75,1.0]", f"run.root={tmp_path}",
                 "run.stages=[train_seg]", *extra]
    rd = open_run("configs/shapes_scribble_densecrf.yaml", overrides)
    run_stages(rd)
    return rd.metrics("train_seg")


@pytest.mark.slow
def test_a_recipe_with_a_frozen_encoder_trains_on_the_cache(tmp_path):
    """auto: on for a frozen encoder, with a regulariser that reads the cropped RGB; off when forced off."""
    metrics = run_train_seg(tmp_path, "run.name=cached")
    cache = metrics["feature_cache"]
    assert cache["images"] == 6 and cache["computed"] == 6 and cache["views"] == 6 and metrics["steps"] == 2
    assert (tmp_path / "cached" / cache["dir"] / "meta.json").is_file()
    off = run_train_seg(tmp_path, "run.name=images", "seg.feature_cache.enabled=false")
    assert "feature_cache" not in off and off["steps"] == 2


def test_forcing_the_cache_on_a_trainable_encoder_is_a_config_error(tmp_path):
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match="seg.feature_cache.enabled=true: .*encoder trains"):
        run_train_seg(tmp_path, "seg.encoder.frozen_stages=1", "seg.feature_cache.enabled=true")


@pytest.mark.slow
def test_two_processes_share_the_fill_and_train_on_it(tmp_path):
    """Under torchrun each image is computed by exactly one process (8 computed for 8 images, not 16)."""
    from tests.test_ddp import torchrun

    overrides = [*tiny_shapes(num_train=8, num_val=2, steps=2, batch=2), "seg.encoder.frozen_stages=10",
                 "seg.encoder.freeze_bn=true", f"run.root={tmp_path}", "run.name=ddp", "run.stages=[train_seg]",
                 f"data.root={tmp_path / 'data'}"]
    torchrun("run", "configs/shapes_scribble_pce.yaml", *overrides)
    metrics = json.loads((tmp_path / "ddp" / "manifest.json").read_text())["stages"]["train_seg"]["metrics"]
    assert metrics["feature_cache"]["computed"] == 8 and metrics["feature_cache"]["images"] == 8
    assert metrics["steps"] == 2
    assert len([p for p in (tmp_path / "ddp" / metrics["feature_cache"]["dir"]).iterdir() if p.is_dir()]) == 8


def test_ids_with_subfolders_are_cached(shapes_ds, tmp_path):
    """Folder data sets name images by their path (farm/cow_01); the cache keeps that layout."""
    class Renamed:
        ids = ["farm/cow_01", "cow_01"]

        def load(self, sid, parts):
            return {"id": sid, "image": shapes_ds.load(shapes_ds.ids[0], ("image",))["image"]}

    method = segmenter()
    layout = layout_of(method, scales=(1.0,), flips=(False,))
    stats = fill_feature_cache(method.cacheable_encoder(), method.norm, Renamed(), Renamed.ids, tmp_path, layout, {},
                               torch.device("cpu"))
    assert stats["computed"] == 2 and level_file(tmp_path / "farm" / "cow_01", 1.0, False, 5).is_file()
    np.testing.assert_array_equal(np.load(level_file(tmp_path / "farm" / "cow_01", 1.0, False, 5)),
                                  np.load(level_file(tmp_path / "cow_01", 1.0, False, 5)))


def test_cache_key_follows_the_encoder_tensors():
    """Equal encoder weights share a cache however they were loaded; a changed tensor (seg.init from a model
    whose encoder trained) gets its own."""
    import copy

    from wsss.engine.feature_cache import encoder_digest

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    same = copy.deepcopy(enc)
    assert encoder_digest(enc) == encoder_digest(same)
    with torch.no_grad():
        same[0].weight[0, 0, 0, 0] += 1e-3
    assert encoder_digest(enc) != encoder_digest(same)


def test_validation_encodes_each_image_once_and_predicts_as_before(shapes_ds):
    """With a frozen encoder, validation (held-out or val, at every epoch) reuses each image's features."""
    from wsss.engine.inference import segment_probs
    from wsss.metrics import ConfusionMatrix

    method = segmenter().eval()
    samples = [shapes_ds.load(i, ("image", "mask")) for i in shapes_ds.ids]
    expected = ConfusionMatrix(7)
    for s in samples:
        expected.update(segment_probs(method, s["image"]).argmax(0), s["mask"])
    calls = []
    method.net.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    for epoch in range(2):
        method.val_confusion = ConfusionMatrix(7)
        with torch.inference_mode():
            method.validation_step(samples, 0)
        np.testing.assert_array_equal(method.val_confusion.matrix, expected.matrix)
        assert len(calls) == 1 + len(samples)  # the level probe + each image once, in the first epoch only
    memo = method.validation_reader()
    assert set(memo.store) == set(shapes_ds.ids) and all(f.numel() == 0 for f in memo.store[shapes_ds.ids[0]][:2])
    method.val_memo_bytes = 0  # past the budget: encoded each time, same predictions
    del method._val_memo
    method.val_confusion = ConfusionMatrix(7)
    with torch.inference_mode():
        method.validation_step(samples, 0)
    np.testing.assert_array_equal(method.val_confusion.matrix, expected.matrix)
    assert len(calls) == 2 + 2 * len(samples) and not method.validation_reader().store


def test_a_trainable_encoder_is_validated_without_memo():
    method = segmenter(frozen_stages=2)
    assert method.validation_reader() is method
