"""Group-WSSS graph network: co-attention messages between the images of a group, ConvGRU updates, graph dropout.

Paper terms (Li et al., AAAI 2021) -> code:
  node embedding h_i^0   `GroupNet.nodes` (the K class maps of the head by default, as the official code;
                         `node="features"`: the head's D-channel features, a classifier reads them out)
  edge / message m_j->i  `CoAttention` (1x1 projections, affinity, softmax over the partner's positions,
                         sigmoid gate)
  aggregation x_i        `GroupGraph.fuse` (3x3 conv over the N-1 concatenated messages; `aggregate="mean"`)
  node update            `ConvGRUCell` (1x1 kernels), T synchronous rounds, weights shared
  graph dropout layer    `GraphDropout` (ADL-style importance map / drop mask, averaged with the input)
  readout                global average pooling of the final nodes
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from wsss.models.backbones import create_backbone, set_bn_eval


class GraphDropout(nn.Module):
    """The official GDL: one draw per call picks the drop mask (p=drop_rate) or the importance map; out = (h*sel + h)/2."""

    def __init__(self, drop_rate: float = 0.8, drop_threshold: float = 0.7, at_eval: bool = False):
        """at_eval: keep it stochastic in eval mode too (the official layer has no training check)."""
        super().__init__()
        if not (0 <= drop_rate <= 1 and 0 <= drop_threshold <= 1):
            raise ValueError(f"graph dropout: drop_rate {drop_rate} and drop_threshold {drop_threshold} must be in [0, 1]")
        self.drop_rate, self.drop_threshold, self.at_eval = drop_rate, drop_threshold, at_eval

    def forward(self, h: torch.Tensor, use_drop: Optional[bool] = None) -> torch.Tensor:
        """(M, C, h, w) -> same shape; `use_drop` forces the branch (None: drawn)."""
        if not self.training and not self.at_eval:
            return h
        att = h.mean(dim=1, keepdim=True)  # (M, 1, h, w)
        if use_drop is None:
            use_drop = bool(torch.rand(()) < self.drop_rate)
        if use_drop:  # hide the most discriminative part: positions above drop_threshold x max
            peak = att.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
            sel = (att < peak * self.drop_threshold).to(h.dtype)
        else:
            sel = torch.sigmoid(att)
        return (h * sel + h) / 2

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, drop_threshold={self.drop_threshold}, at_eval={self.at_eval}"


class CoAttention(nn.Module):
    """Message to node i from node j: m(p) = sum_q softmax_q(a_i(p) . b_j(q)) h_j(q), gated by sigmoid(conv1x1(m))."""

    def __init__(self, channels: int, proj_channels: int):
        super().__init__()
        self.proj_a = nn.Conv2d(channels, proj_channels, 1)
        self.proj_b = nn.Conv2d(channels, proj_channels, 1)
        self.gate = nn.Conv2d(channels, 1, 1, bias=False)

    def attention(self, h_i: torch.Tensor, h_j: torch.Tensor) -> torch.Tensor:
        """(M, C, h, w) x2 -> (M, hw_i, hw_j) weights; each row sums to 1 over node j's positions."""
        a = self.proj_a(h_i).flatten(2)  # (M, P, hw_i)
        b = self.proj_b(h_j).flatten(2)  # (M, P, hw_j)
        return torch.softmax(a.transpose(1, 2) @ b, dim=2)

    def forward(self, h_i: torch.Tensor, h_j: torch.Tensor) -> torch.Tensor:
        """(M, C, h, w) receiving and sending nodes -> gated message (M, C, h, w)."""
        m, c, hh, ww = h_i.shape
        weights = self.attention(h_i, h_j)  # (M, hw_i, hw_j)
        msg = (h_j.flatten(2) @ weights.transpose(1, 2)).view(m, c, hh, ww)  # (M, C, hw_i)
        return msg * torch.sigmoid(self.gate(msg))


class ConvGRUCell(nn.Module):
    """Convolutional GRU: z, r = sigmoid(conv[x, h]); n = tanh(conv[x, r*h]); h' = (1 - z) h + z n."""

    def __init__(self, channels: int, kernel_size: int = 1):
        super().__init__()
        pad = kernel_size // 2
        self.reset_gate = nn.Conv2d(2 * channels, channels, kernel_size, padding=pad)
        self.update_gate = nn.Conv2d(2 * channels, channels, kernel_size, padding=pad)
        self.out_gate = nn.Conv2d(2 * channels, channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """input x and state h (M, C, h, w) -> new state (M, C, h, w)."""
        xh = torch.cat([x, h], dim=1)
        z = torch.sigmoid(self.update_gate(xh))
        r = torch.sigmoid(self.reset_gate(xh))
        n = torch.tanh(self.out_gate(torch.cat([x, h * r], dim=1)))
        return h * (1 - z) + n * z


class GroupGraph(nn.Module):
    """T synchronous rounds of message passing on the complete graph of each group (weights shared everywhere)."""

    def __init__(self, channels: int, group_size: int, steps: int = 3, proj_channels: int = 0, aggregate: str = "concat",
                 dropout: Optional[GraphDropout] = None):
        super().__init__()
        if aggregate not in ("concat", "mean"):
            raise ValueError(f"aggregate must be concat or mean, got {aggregate!r}")
        self.group_size, self.steps, self.aggregate = group_size, steps, aggregate
        self.message = CoAttention(channels, proj_channels or max(1, channels // 2))
        # official: conv3x3 over the concatenated messages, bias, no ReLU; "mean" averages them first
        fused_in = channels * max(1, group_size - 1) if aggregate == "concat" else channels
        self.fuse = nn.Conv2d(fused_in, channels, 3, padding=1)
        self.update = ConvGRUCell(channels, 1)
        self.dropout = dropout

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """One round: (B, N, C, h, w) states -> new states; messages use the previous round's states."""
        b, n = h.shape[:2]
        new = []
        for i in range(n):
            msgs = [self.message(h[:, i], h[:, j]) for j in range(n) if j != i]
            if not msgs:  # a group of one: no partner, the node keeps its state
                new.append(h[:, i])
                continue
            x = torch.cat(msgs, dim=1) if self.aggregate == "concat" else torch.stack(msgs).mean(0)
            state = self.update(self.fuse(x), h[:, i])
            new.append(self.dropout(state) if self.dropout is not None else state)
        return torch.stack(new, dim=1)

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        """(B, N, C, h, w) initial nodes -> (B, N, C, h, w) after `steps` rounds."""
        h = h0
        for _ in range(self.steps):
            h = self.step(h)
        return h


def dilate_vgg(model: nn.Module) -> nn.Module:
    """timm VGG features -> the official `D1` layout (output stride 8): pool4 becomes 3x3/1, block-5 convs dilation 2."""
    mods = [(name, m) for name, m in model.named_children()]
    pools = [i for i, (_, m) in enumerate(mods) if isinstance(m, nn.MaxPool2d)]
    if len(pools) < 4:
        raise ValueError("dilate_vgg: expected a timm VGG feature extractor with 4+ max pools")
    setattr(model, mods[pools[3]][0], nn.MaxPool2d(3, stride=1, padding=1))
    for name, m in mods[pools[3] + 1 :]:
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            m.dilation, m.padding = (2, 2), (2, 2)
    if len(pools) > 4:  # pool5 is not part of D1
        setattr(model, mods[pools[4]][0], nn.Identity())
    return model


def _vgg_backbone(cfg: Any) -> nn.Module:
    """A timm VGG feature extractor at output stride 8 (the official D1): its last conv block, dilated."""
    model = create_backbone(_with(cfg, output_stride=32), out_indices=(-1,))
    if cfg.output_stride == 8:
        dilate_vgg(model)
    elif cfg.output_stride != 32:
        raise ValueError(f"VGG backbones support output_stride 8 (official D1) or 32, got {cfg.output_stride}")
    return model


def _with(cfg: Any, **changes: Any) -> Any:
    """A copy of a BackboneConfig-like dataclass instance with some fields changed."""
    from dataclasses import replace

    return replace(cfg, **changes)


class GroupNet(nn.Module):
    """Backbone + head (convs, 1x1 classifier) + group graph: per-image CAMs, group logits and mining maps."""

    def __init__(self, backbone_cfg: Any, num_classes: int, group_size: int = 3, steps: int = 3, node: str = "cams",
                 head_convs: int = 3, head_channels: int = 512, proj_channels: int = 0, aggregate: str = "concat",
                 dropout: Optional[GraphDropout] = None, init_std: float = 0.01):
        """num_classes: foreground classes K; node: "cams" (official, K-channel nodes) or "features" (head_channels)."""
        super().__init__()
        if node not in ("cams", "features"):
            raise ValueError(f"node must be cams or features, got {node!r}")
        is_vgg = str(backbone_cfg.name).startswith("vgg")
        self.backbone = _vgg_backbone(backbone_cfg) if is_vgg else create_backbone(backbone_cfg, out_indices=(-1,))
        self.freeze_bn = bool(backbone_cfg.freeze_bn)
        self.group_size, self.node = group_size, node
        channels = self.backbone.feature_info.channels()[-1]
        layers: list[nn.Module] = []
        for _ in range(head_convs):  # official extra_convs: 3 x (3x3 conv 512 + ReLU)
            layers += [nn.Conv2d(channels, head_channels, 3, padding=1), nn.ReLU(inplace=True)]
            channels = head_channels
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        graph_channels = num_classes if node == "cams" else channels
        self.graph = GroupGraph(graph_channels, group_size, steps, proj_channels, aggregate, dropout)
        for m in self.new_modules():
            for conv in m.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, 0.0, init_std)  # official: all new convs N(0, 0.01)
        if self.freeze_bn:
            set_bn_eval(self.backbone)

    def new_modules(self) -> list[nn.Module]:
        return [self.head, self.classifier, self.graph]

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers that are not pretrained (the official `extra*` groups)."""
        return [p for m in self.new_modules() for p in m.parameters()]

    def nodes(self, x: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> initial node embeddings (M, C, h, w): class maps (node=cams) or head features."""
        feats = self.head(self.backbone(x)[-1])
        return self.classifier(feats) if self.node == "cams" else feats

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Node states (..., C, h, w) -> class maps (..., K, h, w)."""
        if self.node == "cams":
            return h
        lead = h.shape[:-3]
        return self.classifier(h.flatten(0, len(lead) - 1)).unflatten(0, lead) if lead else self.classifier(h)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Single images (M, 3, H, W) -> logits (M, K) and raw CAMs (M, K, h, w) from the initial nodes (no graph)."""
        cams = self.readout(self.nodes(x))
        return {"logits": cams.mean(dim=(2, 3)), "cams": cams}

    def forward_group(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Groups (B*N, 3, H, W), anchor first in each -> initial/final maps (B, N, K, h, w) and logits (B, N, K)."""
        h0 = self.nodes(x)
        h0 = h0.unflatten(0, (-1, self.group_size))
        ht = self.graph(h0)
        cams0, camst = self.readout(h0), self.readout(ht)
        return {"cams0": cams0, "camsT": camst, "logits0": cams0.mean(dim=(3, 4)), "logitsT": camst.mean(dim=(3, 4))}

    def train(self, mode: bool = True) -> "GroupNet":
        super().train(mode)
        if self.freeze_bn:
            set_bn_eval(self.backbone)
        return self
