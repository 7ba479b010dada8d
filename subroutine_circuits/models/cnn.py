"""A hooked ResNet-style CNN for the vision odd-one-out tasks (a ``HookedRootModule``).

Architecture (as in the paper's vision models, Lepori et al. 2023):

    images [n, 3, h, w]
      -> stem: conv (no bias) -> InstanceNorm2d(affine=False) -> ReLU   (stem.hook_post)
               [-> 3x3 max-pool, stride 2, for the ResNet50-like presets]
      -> residual stages of basic blocks (CPU presets) or bottleneck blocks (ResNet50-like)
      -> global average pool                                             (hook_pooled)
      -> head: Linear(d, d_hidden) -> ReLU                               (head.hook_hidden)
               -> Linear(d_hidden, d_embed)                              (hook_embed)

Every normalisation is ``InstanceNorm2d(affine=False, track_running_stats=False)``: it has no
parameters and behaves identically in train and eval mode.

Hook points (TransformerLens-style names; "units" are what unit masks act on):

================================================  ===================  ==========================
hook                                              shape                role
================================================  ===================  ==========================
``stem.hook_post``                                [n, c_stem, h, w]    channel units
``stages.{s}.blocks.{b}.hook_hidden``             [n, width, h, w]     channel units (after the
                                                                       block's first conv, norm
                                                                       and ReLU)
``stages.{s}.blocks.{b}.hook_hidden2``            [n, width, h, w]     channel units (bottleneck
                                                                       only: after the 3x3 conv)
``stages.{s}.blocks.{b}.hook_out``                [n, c_out, h, w]     residual stream, NOT units
``hook_pooled``                                   [n, c_last]          pooled stream, NOT units
``head.hook_hidden``                              [n, d_hidden]        neuron units
``hook_embed``                                    [n, d_embed]         the embedding
================================================  ===================  ==========================

**No bypass.** The only inputs of the residual stream are the stem (masked as a unit group) and
the blocks' last convs, which read only masked hidden channels; the 1x1 shortcut (downsample)
convs read the block *input*, which is itself computed from masked channels only. So when the
stem and every hidden group are ablated (zero or mean), every stream tensor, and hence the
embedding, is the same for every input. ``head.hook_hidden`` is a second, complete cut. When only
some stages are masked the stream entering the first masked stage carries the input through the
shortcut: then only the head's hidden layer cuts it (and :func:`cnn_unit_groups` always includes
it unless told otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from subroutine_circuits.masks.units import UnitGroup
from subroutine_circuits.models.readout import ooo_scores as _ooo_scores

BLOCK_KINDS = ("basic", "bottleneck")


@dataclass
class CNNConfig:
    """Architecture of a :class:`HookedCNN` (defaults: the ``cpu`` preset, ~170k parameters).

    Attributes:
        image_size: side of the (square) training images; only used for checks and reports
            (the network pools globally, so other sizes also run).
        in_channels: image channels (3 for RGB).
        stem_channels: output channels of the stem conv.
        stem_kernel, stem_stride: the stem conv's kernel size and stride.
        stem_pool: a 3x3 max-pool of stride 2 after the stem (ResNet50-like presets).
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1 convs).
        stage_widths: hidden width (channels of the hidden units) of each stage's blocks.
        stage_channels: output (residual stream) channels of each stage.
        stage_blocks: number of residual blocks per stage.
        stage_strides: stride of each stage's first block (on the 3x3 conv and the shortcut).
        d_hidden: hidden neurons of the MLP head.
        d_embed: embedding size (output of the head).
        norm_eps: epsilon of every InstanceNorm2d.
        seed: seed of the kaiming initialisation.
        device: where the model lives.
        preset: name of the preset it was built from (informational).
    """

    image_size: int = 32
    in_channels: int = 3
    stem_channels: int = 16
    stem_kernel: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    block: str = "basic"
    stage_widths: tuple[int, ...] = (16, 32, 64, 64)
    stage_channels: tuple[int, ...] = (16, 32, 64, 64)
    stage_blocks: tuple[int, ...] = (1, 1, 1, 1)
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    d_hidden: int = 128
    d_embed: int = 64
    norm_eps: float = 1e-5
    seed: int = 0
    device: str = "cpu"
    preset: str = "custom"

    def __post_init__(self) -> None:
        for name in ("stage_widths", "stage_channels", "stage_blocks", "stage_strides"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("image_size", "in_channels", "stem_channels", "stem_kernel", "stem_stride"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CNNConfig.{name} must be an int >= 1, got {v!r}")
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"CNNConfig.block must be one of {BLOCK_KINDS}, got {self.block!r}")
        n = len(self.stage_widths)
        if n == 0:
            raise ValueError("CNNConfig needs at least one stage (stage_widths is empty)")
        for name in ("stage_channels", "stage_blocks", "stage_strides"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"CNNConfig.{name} has {len(getattr(self, name))} entries, stage_widths has {n}"
                )
        for name in ("stage_widths", "stage_channels", "stage_blocks", "stage_strides"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(
                    f"CNNConfig.{name} entries must be >= 1, got {getattr(self, name)}"
                )
        for name in ("d_hidden", "d_embed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CNNConfig.{name} must be an int >= 1, got {v!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"CNNConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def n_stages(self) -> int:
        """Number of residual stages."""
        return len(self.stage_widths)

    @property
    def total_stride(self) -> int:
        """Downsampling factor from the image to the last stage."""
        s = self.stem_stride * (2 if self.stem_pool else 1)
        for v in self.stage_strides:
            s *= v
        return s

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNNConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown CNNConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


# Presets. ``resnet50`` follows torchvision's ResNet50 v1.5 layout (stride on the 3x3 conv) with
# InstanceNorm; ``wide_resnet50`` doubles the bottleneck widths (Wide ResNet-50-2).
CNN_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        image_size=32,
        stem_channels=16,
        block="basic",
        stage_widths=(16, 32, 64, 64),
        stage_channels=(16, 32, 64, 64),
        stage_blocks=(1, 1, 1, 1),
        stage_strides=(1, 2, 2, 2),
        d_hidden=128,
        d_embed=64,
    ),
    "cpu_wide": dict(
        image_size=40,
        stem_channels=32,
        block="basic",
        stage_widths=(32, 64, 128, 128),
        stage_channels=(32, 64, 128, 128),
        stage_blocks=(1, 1, 1, 1),
        stage_strides=(1, 2, 2, 2),
        d_hidden=256,
        d_embed=128,
    ),
    "resnet50": dict(
        image_size=128,
        stem_channels=64,
        stem_kernel=7,
        stem_stride=2,
        stem_pool=True,
        block="bottleneck",
        stage_widths=(64, 128, 256, 512),
        stage_channels=(256, 512, 1024, 2048),
        stage_blocks=(3, 4, 6, 3),
        stage_strides=(1, 2, 2, 2),
        d_hidden=2048,
        d_embed=128,
    ),
    "wide_resnet50": dict(
        image_size=128,
        stem_channels=64,
        stem_kernel=7,
        stem_stride=2,
        stem_pool=True,
        block="bottleneck",
        stage_widths=(128, 256, 512, 1024),
        stage_channels=(256, 512, 1024, 2048),
        stage_blocks=(3, 4, 6, 3),
        stage_strides=(1, 2, 2, 2),
        d_hidden=2048,
        d_embed=128,
    ),
}


def cnn_config(preset: str = "cpu", **overrides: Any) -> CNNConfig:
    """The :class:`CNNConfig` of a preset (``cpu``, ``cpu_wide``, ``resnet50``,
    ``wide_resnet50``) with fields overridden by keyword."""
    if preset not in CNN_PRESETS:
        raise ValueError(f"unknown CNN preset {preset!r}; choose one of {sorted(CNN_PRESETS)}")
    kw = dict(CNN_PRESETS[preset])
    kw["preset"] = preset
    names = {f.name for f in dataclasses.fields(CNNConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown CNNConfig field(s) {unknown}; known: {sorted(names)}")
    kw.update(overrides)
    return CNNConfig(**kw)


class InstanceNorm(nn.InstanceNorm2d):
    """``InstanceNorm2d(affine=False, track_running_stats=False)``, computed as group norm with
    one group per channel: the same function (each channel normalised over its own spatial
    positions, per image; equal to ``F.instance_norm`` within float rounding), but torch's
    group-norm kernels are several times faster on the CPU than its instance-norm path (which
    reshapes to a batch norm over ``n * c`` channels)."""

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n c h w"]:
        return F.group_norm(x, self.num_features, eps=self.eps)


def _norm(channels: int, eps: float) -> InstanceNorm:
    """Instance norm without affine parameters or running statistics (as in the paper)."""
    return InstanceNorm(channels, eps=eps, affine=False, track_running_stats=False)


# Strided 1x1 convolutions with fewer input channels than this run as "subsample, then a
# unit-stride 1x1 convolution" on the CPU (see :class:`SafeConv2d`).
STRIDED_1X1_MAX_IN_CHANNELS = 16


class SafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that routes around a oneDNN bug on the CPU (same parameters, same function).

    oneDNN 3.12 (torch 2.13's CPU build) computes the weight gradient of a 1x1 convolution with
    stride > 1 over a channels-last input with fewer input channels than its SIMD block (8
    floats with AVX2) past the end of its workspace: with AVX2 kernels (AVX2-only CPUs, or
    ``ONEDNN_MAX_CPU_ISA=AVX2``) ``backward()`` dies of SIGSEGV / SIGABRT on one thread, and
    hangs or returns a wrong gradient on several (upstream: uxlfoundation/oneDNN#6035;
    ``benchmarks/repro_onednn_avx2.py``). Images built from ``[.., h, w, 3]`` arrays reach the
    network channels-last, and the 1x1 stride-2 shortcut of a stage whose input has few channels
    (the tiny test models), or a 1x1 strided stem, hits it.

    Such a convolution (kernel 1, stride > 1, no padding or dilation, one group, fewer than
    :data:`STRIDED_1X1_MAX_IN_CHANNELS` input channels; 16, AVX-512's block, also covers the
    AVX-512 kernel, which the upstream report patches too but which was not seen to fail) runs
    here on CPU tensors as ``conv2d(x[:, :, ::s_h, ::s_w], W)`` with stride 1: the same outputs
    up to float rounding, the same parameters and state dict, and oneDNN's unit-stride kernels,
    which are correct. It is decided by the layer's shape and the device only, so a model
    computes the same way on every CPU. Every other convolution (all of the presets') runs as
    plain ``nn.Conv2d``. Set ``SafeConv2d.reroute = False`` to turn this off
    (``benchmarks/bench_onednn_1x1.py``).
    """

    reroute: bool = True

    def rerouted(self, x: Tensor) -> bool:
        """Whether :meth:`forward` computes this convolution as subsample + unit-stride 1x1."""
        return (
            SafeConv2d.reroute
            and x.device.type == "cpu"
            and self.kernel_size == (1, 1)
            and self.stride != (1, 1)
            and self.padding == (0, 0)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.in_channels < STRIDED_1X1_MAX_IN_CHANNELS
        )

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h2 w2"]:
        """The convolution of ``x`` (rerouted as :meth:`rerouted` says)."""
        if self.rerouted(x):
            sh, sw = self.stride
            return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)
        return super().forward(x)


class Stem(nn.Module):
    """conv -> InstanceNorm -> ReLU (-> max-pool); ``hook_post`` holds the stem's channel units."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        k = cfg.stem_kernel
        self.conv = SafeConv2d(
            cfg.in_channels, cfg.stem_channels, k, cfg.stem_stride, padding=k // 2, bias=False
        )
        self.norm = _norm(cfg.stem_channels, cfg.norm_eps)
        self.hook_post = HookPoint()  # [batch, stem_channels, h, w]
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if cfg.stem_pool else None

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n c_stem h2 w2"]:
        x = self.hook_post(F.relu(self.norm(self.conv(x))))
        # The pool comes after the hook: an ablated (spatially constant) channel stays constant.
        return self.pool(x) if self.pool is not None else x


class _Shortcut(nn.Module):
    """Identity, or a 1x1 conv (stride) + InstanceNorm when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, eps: float):
        super().__init__()
        if stride != 1 or c_in != c_out:
            self.conv = SafeConv2d(c_in, c_out, 1, stride, bias=False)
            self.norm = _norm(c_out, eps)
        else:
            self.conv = None
            self.norm = None

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h2 w2"]:
        if self.conv is None:
            return x
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection.

    ``hook_hidden`` [n, width, h, w] (after conv1, norm, ReLU) holds the block's channel units;
    ``hook_out`` [n, c_out, h, w] is the residual stream after the block.
    """

    def __init__(self, c_in: int, width: int, c_out: int, stride: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, padding=1, bias=False)
        self.norm1 = _norm(width, eps)
        self.hook_hidden = HookPoint()  # [batch, width, h, w]
        self.conv2 = nn.Conv2d(width, c_out, 3, 1, padding=1, bias=False)
        self.norm2 = _norm(c_out, eps)
        self.shortcut = _Shortcut(c_in, c_out, stride, eps)
        self.hook_out = HookPoint()  # [batch, c_out, h, w] (residual stream)

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h2 w2"]:
        h = self.hook_hidden(F.relu(self.norm1(self.conv1(x))))
        y = self.norm2(self.conv2(h))
        return self.hook_out(F.relu(y + self.shortcut(x)))


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 convs with a residual connection (ResNet50 v1.5).

    ``hook_hidden`` [n, width, h, w] (after the 1x1 conv1, norm, ReLU) and ``hook_hidden2``
    [n, width, h2, w2] (after the 3x3 conv2, norm, ReLU) hold the block's channel units;
    ``hook_out`` [n, c_out, h2, w2] is the residual stream after the block.
    """

    def __init__(self, c_in: int, width: int, c_out: int, stride: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.norm1 = _norm(width, eps)
        self.hook_hidden = HookPoint()  # [batch, width, h, w]
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.norm2 = _norm(width, eps)
        self.hook_hidden2 = HookPoint()  # [batch, width, h2, w2]
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.norm3 = _norm(c_out, eps)
        self.shortcut = _Shortcut(c_in, c_out, stride, eps)
        self.hook_out = HookPoint()  # [batch, c_out, h2, w2] (residual stream)

    def forward(self, x: Float[Tensor, "n c_in h w"]) -> Float[Tensor, "n c_out h2 w2"]:
        h = self.hook_hidden(F.relu(self.norm1(self.conv1(x))))
        h = self.hook_hidden2(F.relu(self.norm2(self.conv2(h))))
        y = self.norm3(self.conv3(h))
        return self.hook_out(F.relu(y + self.shortcut(x)))


class Stage(nn.Module):
    """A sequence of residual blocks (``blocks.{b}``); the first one carries the stride."""

    def __init__(self, cfg: CNNConfig, s: int, c_in: int):
        super().__init__()
        block_cls = BasicBlock if cfg.block == "basic" else BottleneckBlock
        blocks = []
        for b in range(cfg.stage_blocks[s]):
            blocks.append(
                block_cls(
                    c_in if b == 0 else cfg.stage_channels[s],
                    cfg.stage_widths[s],
                    cfg.stage_channels[s],
                    cfg.stage_strides[s] if b == 0 else 1,
                    cfg.norm_eps,
                )
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Float[Tensor, "n c h w"]) -> Float[Tensor, "n c2 h2 w2"]:
        for block in self.blocks:
            x = block(x)
        return x


class Head(nn.Module):
    """The MLP head ``fc_hidden -> ReLU (hook_hidden: neuron units) -> fc_out``.

    (Its parameter names avoid the word "embed": weight masks reject parameters named so.)
    """

    def __init__(self, d_in: int, d_hidden: int, d_embed: int):
        super().__init__()
        self.fc_hidden = nn.Linear(d_in, d_hidden)
        self.hook_hidden = HookPoint()  # [batch, d_hidden]
        self.fc_out = nn.Linear(d_hidden, d_embed)

    def forward(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_embed"]:
        return self.fc_out(self.hook_hidden(F.relu(self.fc_hidden(x))))


class HookedCNN(HookedRootModule):
    """A ResNet-style CNN with TransformerLens hook points (see the module docstring).

    ``model(images)`` and :meth:`embed` map ``[n, 3, h, w]`` images to ``[n, d_embed]``
    embeddings; :meth:`ooo_scores` maps ``[b, 4, 3, h, w]`` odd-one-out problems to ``[b, 4]``
    logits. ``run_with_cache``, ``run_with_hooks`` and the mask engine work as for
    transformers (``UnitMask.set_mean(model, images)`` included).

    Example::

        model = HookedCNN("cpu")              # or HookedCNN(cnn_config("resnet50", seed=1))
        logits = model.ooo_scores(problems)   # [b, 4]
        mask = UnitMask(UnitMap(cnn_unit_groups(model)), MaskConfig())
    """

    def __init__(self, cfg: CNNConfig | str | None = None, **overrides: Any):
        """Build from a config, a preset name (with field ``overrides``) or the default ``cpu``."""
        super().__init__()
        if cfg is None:
            cfg = "cpu"
        if isinstance(cfg, str):
            cfg = cnn_config(cfg, **overrides)
        elif overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if not isinstance(cfg, CNNConfig):
            raise ValueError(f"HookedCNN needs a CNNConfig or a preset name, got {type(cfg)}")
        cfg.validate()
        self.cfg = cfg
        self.stem = Stem(cfg)
        stages = []
        c_in = cfg.stem_channels
        for s in range(cfg.n_stages):
            stages.append(Stage(cfg, s, c_in))
            c_in = cfg.stage_channels[s]
        self.stages = nn.ModuleList(stages)
        self.hook_pooled = HookPoint()  # [batch, c_last]
        self.head = Head(c_in, cfg.d_hidden, cfg.d_embed)
        self.hook_embed = HookPoint()  # [batch, d_embed]
        reinit_cnn(self, cfg.seed)
        self.setup()
        self.to(cfg.device)

    # ------------------------------------------------------------------ forward passes
    def _check_images(self, images: Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is a float ``[n, in_channels, h, w]`` batch
        large enough to survive the network's downsampling."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(
                f"images must be a 4-d [n, {self.cfg.in_channels}, h, w] tensor, got "
                f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}"
            )
        if not images.dtype.is_floating_point:
            raise ValueError(f"images must be a float tensor (normalised), got {images.dtype}")
        if images.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, the model expects {self.cfg.in_channels}"
            )
        if images.shape[0] == 0:
            raise ValueError("empty batch: images has 0 items")
        min_side = 2 * self.cfg.total_stride
        if min(images.shape[2], images.shape[3]) < min_side:
            raise ValueError(
                f"images of {images.shape[2]}x{images.shape[3]} px are too small for this model "
                f"(total stride {self.cfg.total_stride}: at least {min_side} px per side)"
            )

    def forward(self, images: Float[Tensor, "n c h w"]) -> Float[Tensor, "n d_embed"]:
        """Embeddings of a batch of normalised images (gradients flow, hooks fire)."""
        self._check_images(images)
        x = self.stem(images.to(self.device))
        for stage in self.stages:
            x = stage(x)
        pooled = self.hook_pooled(x.mean(dim=(2, 3)))
        return self.hook_embed(self.head(pooled))

    def embed(self, images: Float[Tensor, "n c h w"]) -> Float[Tensor, "n d_embed"]:
        """Same as ``model(images)`` (calls the module, so forward pre-hooks such as weight masks'
        parameter refresh run)."""
        return self(images)

    def ooo_scores(self, problems: Float[Tensor, "b k c h w"]) -> Float[Tensor, "b k"]:
        """Odd-one-out logits ``-sum_{j != i} <e_i, e_j>`` of L2-normalised embeddings.

        ``problems`` is ``[b, k, c, h, w]`` (k = 4 stimuli per problem); one forward pass of
        ``b * k`` images.
        """
        if not isinstance(problems, Tensor) or problems.ndim != 5:
            raise ValueError(
                f"problems must be a 5-d [b, 4, c, h, w] tensor, got "
                f"{tuple(getattr(problems, 'shape', ())) or type(problems).__name__}"
            )
        b, k = problems.shape[:2]
        emb = self(problems.reshape(b * k, *problems.shape[2:]))
        return _ooo_scores(emb.view(b, k, -1))

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def n_params(self) -> int:
        """Number of parameters (InstanceNorm has none)."""
        return sum(p.numel() for p in self.parameters())

    def reset_head(self, seed: int = 0) -> None:
        """Re-initialise the MLP head (kaiming, seeded); the rest keeps its weights.

        Used after SimCLR pretraining: the projection head is dropped and the OOO head is trained
        from scratch.
        """
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for name, p in self.head.named_parameters():
                p.copy_(_init_value(f"head.{name}", tuple(p.shape), gen).to(p.device, p.dtype))

    def blocks(self) -> list[tuple[int, int, nn.Module]]:
        """``(stage, block, module)`` of every residual block, in forward order."""
        return [(s, b, blk) for s, st in enumerate(self.stages) for b, blk in enumerate(st.blocks)]


# ---------------------------------------------------------------------- initialisation
def _init_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """A fresh kaiming value for parameter ``name`` (CPU, float32).

    Convs: kaiming normal, fan_out, ReLU gain (torchvision's ResNet init); ``head.fc_hidden``:
    kaiming normal, fan_in, ReLU gain; ``head.fc_out``: kaiming normal, fan_in, linear gain;
    biases: zero.
    """
    if name.endswith("bias") or len(shape) < 2:
        return torch.zeros(shape)
    t = torch.empty(shape)
    if len(shape) == 4:
        nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=gen)
    elif name.startswith("head.fc_out"):
        nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="linear", generator=gen)
    else:
        nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="relu", generator=gen)
    return t


def reinit_cnn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter of a :class:`HookedCNN` (kaiming, as the paper), seeded.

    This is the ``random_init`` control: an untrained network of the same architecture. Returns
    ``model`` (modified in place).
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_init_value(name, tuple(p.shape), gen).to(p.device, p.dtype))
    return model


def cnn_reinit_values(
    model: nn.Module, param_names: Sequence[str], seed: int = 0
) -> dict[str, Tensor]:
    """Fresh kaiming values ``{name: tensor}`` for a weight mask's ``reinit`` ablation.

    Pass as ``WeightMask(model, MaskConfig(ablation="reinit"), names, reinit=values)``: the
    CNN has no ``cfg.initializer_range``, and each layer has its own kaiming scale.
    """
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    out = {}
    for n in param_names:
        if n not in params:
            raise ValueError(f"unknown parameter {n!r}: the model has no such parameter")
        out[n] = _init_value(n, tuple(params[n].shape), gen)
    return out


# ---------------------------------------------------------------------- units and weights
def _check_model(model: Any) -> None:
    if not isinstance(model, HookedCNN):
        raise ValueError(f"expected a HookedCNN, got {type(model).__name__}")


def _resolve_stages(model: HookedCNN, stages: Sequence[int] | None) -> list[int]:
    """Validated 0-based stage indices (default: all)."""
    n = model.cfg.n_stages
    if stages is None:
        return list(range(n))
    out = sorted({int(s) for s in stages})
    if not out:
        raise ValueError("stages is empty: pass None for all stages")
    for s in out:
        if not 0 <= s < n:
            raise ValueError(f"stage {s} out of range: the model has {n} stages (0..{n - 1})")
    return out


def cnn_layer_table(model: HookedCNN) -> list[dict[str, Any]]:
    """Every unit hook of ``model`` in forward order, with its ordinal ``layer``.

    Rows: ``{"layer", "hook_name", "stage", "block", "kind", "size"}``; ``stage``/``block`` are
    -1 for the stem and the head. The ordinal (0 = stem, then every hidden hook, the head last)
    is the ``layer`` of the unit groups, so per-layer statistics are per hook point.
    """
    _check_model(model)
    cfg = model.cfg
    rows = [dict(hook_name="stem.hook_post", stage=-1, block=-1, kind="channel",
                 size=cfg.stem_channels)]  # fmt: skip
    for s, b, _ in model.blocks():
        suffixes = ["hook_hidden"] + (["hook_hidden2"] if cfg.block == "bottleneck" else [])
        for suf in suffixes:
            rows.append(
                dict(
                    hook_name=f"stages.{s}.blocks.{b}.{suf}",
                    stage=s,
                    block=b,
                    kind="channel",
                    size=cfg.stage_widths[s],
                )
            )
    rows.append(dict(hook_name="head.hook_hidden", stage=-1, block=-1, kind="neuron",
                     size=cfg.d_hidden))  # fmt: skip
    for i, r in enumerate(rows):
        r["layer"] = i
    return rows


def cnn_unit_groups(
    model: HookedCNN,
    stages: Sequence[int] | None = None,
    include_stem: bool | None = None,
    include_head: bool = True,
) -> list[UnitGroup]:
    """Unit groups of a :class:`HookedCNN` for ``UnitMap(...)``.

    Conv hooks (``stem.hook_post``, every block's ``hook_hidden`` and, for bottlenecks,
    ``hook_hidden2``) are ``"channel"`` groups on axis 1 of ``[n, c, h, w]`` (the mean ablation
    value averages batch and space); ``head.hook_hidden`` is a ``"neuron"`` group on axis 1 of
    ``[n, d_hidden]``. ``layer`` is the hook's ordinal from :func:`cnn_layer_table`.

    Args:
        model: the CNN.
        stages: 0-based stages whose blocks are masked (default: all).
        include_stem: mask the stem's channels (default: only when ``stages`` is None).
        include_head: mask the head's hidden neurons (default True; without the head and with
            only some stages the shortcut path carries the input past every mask).
    """
    _check_model(model)
    chosen = _resolve_stages(model, stages)
    if include_stem is None:
        include_stem = stages is None
    groups = []
    for r in cnn_layer_table(model):
        if r["hook_name"] == "stem.hook_post" and not include_stem:
            continue
        if r["hook_name"] == "head.hook_hidden" and not include_head:
            continue
        if r["stage"] >= 0 and r["stage"] not in chosen:
            continue
        groups.append(UnitGroup(r["hook_name"], 1, int(r["size"]), int(r["layer"]), r["kind"]))
    if not groups:
        raise ValueError("cnn_unit_groups: the selection contains no unit group")
    return groups


def cnn_weight_names(
    model: HookedCNN,
    stages: Sequence[int] | None = None,
    include_stem: bool | None = None,
    include_head: bool = True,
) -> list[str]:
    """Names of the maskable weights of a :class:`HookedCNN`, in forward order.

    Every conv kernel of the chosen stages' blocks (including the 1x1 shortcut/downsample convs),
    the stem conv (default: only when ``stages`` is None) and both head Linear weights. Biases
    and norms (InstanceNorm has no parameters) are never included.
    """
    _check_model(model)
    chosen = _resolve_stages(model, stages)
    if include_stem is None:
        include_stem = stages is None
    names = []
    if include_stem:
        names.append("stem.conv.weight")
    for s, b, blk in model.blocks():
        if s not in chosen:
            continue
        prefix = f"stages.{s}.blocks.{b}"
        convs = ["conv1", "conv2"] + (["conv3"] if hasattr(blk, "conv3") else [])
        names += [f"{prefix}.{c}.weight" for c in convs]
        if blk.shortcut.conv is not None:
            names.append(f"{prefix}.shortcut.conv.weight")
    if include_head:
        names += ["head.fc_hidden.weight", "head.fc_out.weight"]
    if not names:
        raise ValueError("cnn_weight_names: the selection contains no weight")
    return names


CNN_FORMAT_VERSION = 1


def save_cnn(directory: str | os.PathLike, model: HookedCNN, meta: dict | None = None) -> Path:
    """Write ``config.json`` (model class + CNNConfig), ``weights.pt`` (CPU state dict) and
    ``meta.json`` (free-form, written last) to ``directory`` atomically; returns it.

    The layout is that of ``models.checkpoint`` (without a vocabulary).
    """
    from subroutine_circuits.utils import atomic_torch_save, atomic_write_json

    _check_model(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": CNN_FORMAT_VERSION,
        "model_class": "HookedCNN",
        "cfg": model.cfg.to_dict(),
    }
    atomic_write_json(directory / "config.json", config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, directory / "weights.pt")
    atomic_write_json(directory / "meta.json", dict(meta or {}))
    return directory


def load_cnn(directory: str | os.PathLike, device: str = "cpu") -> tuple[HookedCNN, dict]:
    """Inverse of :func:`save_cnn`: ``(model in eval mode on device, meta)``."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"no CNN checkpoint in {directory} (config.json missing)")
    config = json.loads(cfg_path.read_text())
    if config.get("model_class") != "HookedCNN":
        raise ValueError(
            f"{directory} holds a {config.get('model_class')!r} checkpoint, not a HookedCNN"
        )
    cfg = CNNConfig.from_dict({**config["cfg"], "device": device})
    model = HookedCNN(cfg)
    state = torch.load(directory / "weights.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return model.eval(), meta


def count_params(cfg: CNNConfig | str) -> int:
    """Parameter count of a config or preset (builds the model on the meta device)."""
    cfg = cnn_config(cfg) if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        m = HookedCNN(dataclasses.replace(cfg, device="meta"))
    return m.n_params


def image_grid_size(cfg: CNNConfig) -> list[int]:
    """Spatial side of each stage's output for ``cfg.image_size`` images (for reports)."""
    side = math.ceil(cfg.image_size / cfg.stem_stride)
    if cfg.stem_pool:
        side = math.ceil(side / 2)
    out = []
    for s in cfg.stage_strides:
        side = math.ceil(side / s)
        out.append(side)
    return out
