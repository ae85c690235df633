"""A residual convolutional network, growable in depth at every stage (``conv`` sites)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Union

from torch import Tensor, nn

from ..method.activations import activation_spec, get_activation
from ..registry import register
from ..sites import SiteSpec, site_at, sites
from ..sites.conv import ResidualConvBlock

__all__ = ["ResidualCNN", "HEADS"]

#: heads of a ResidualCNN: global pooling + linear, or a per-pixel 1x1 convolution
HEADS = ("pool", "pixel")

ActSpec = Union[str, nn.Module, None]


def _int_seq(name: str, value: object, lo: int) -> List[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) or v < lo for v in value):
        raise ValueError(f"ResidualCNN: {name} must be a non-empty list/tuple of ints >= {lo}, got {value!r}")
    return [int(v) for v in value]


@register
class ResidualCNN(nn.Module):
    """A residual CNN with same-shape stages, growable in depth (one ``conv`` site container per stage).

    ``x [B, in_channels, H, W] -> stem: activation(Conv2d(in_channels, channels[0], k, same padding))
    -> stages[0] -> downsample[0] -> stages[1] -> ... -> stages[-1] -> global average pooling ->
    head: Linear(channels[-1], d_out) -> [B, d_out]``.

    ``stages[i]`` is an ``nn.Sequential`` of ``depths[i]`` :class:`ResidualConvBlock` s with
    ``channels[i]`` channels at one resolution: every block keeps the stream's shape, so every
    position of a stage is a candidate point. ``downsample[i]`` (``activation(Conv2d(channels[i],
    channels[i + 1], 3, stride 2, padding 1))``) halves the resolution between stages and is kept
    OUTSIDE the stage containers. Any ``H, W >= 1`` work (the head pools globally).

    With ``head="pixel"`` (dense prediction, e.g. a field-to-field regression) there is no pooling:
    the head is a 1x1 ``Conv2d(channels[-1], d_out)`` applied at every pixel of the last stage and the
    output is flattened channel-major to ``[B, d_out * H' * W']`` (``H' = H``, ``W' = W`` with one stage).

    The stem and downsampling activation defaults to tanh (never an inserted block, so it need not
    be admissible; it keeps the stream of order one); blocks default to :class:`TDActivation`.

    Args:
        in_channels: input channels. d_out: outputs (classes, or regression targets).
        channels: channels of each stage. depths: blocks of each stage (0 allowed: the stage's
            one candidate point is then the stream entering it).
        kernel_size: odd kernel size of the stem and the blocks.
        activation: stem / downsampling activation spec (default ``"tanh"``).
        block_activation: activation of the blocks (default ``"td"``).
        insert_activation: activation of blocks inserted by growth (default: ``block_activation``);
            it must be admissible (checked when scoring / inserting).
        bias: blocks' convolutions have a bias.
        head: ``"pool"`` (default: global average pooling + ``Linear(channels[-1], d_out)``) or
            ``"pixel"`` (1x1 convolution to ``d_out`` channels per pixel, flattened; see above).

    Raises:
        ValueError: bad sizes, channels and depths of different lengths, an even kernel size, an
            unknown head.
    """

    def __init__(self, in_channels: int, d_out: int, channels: Sequence[int] = (16, 32),
                 depths: Sequence[int] = (2, 2), *, kernel_size: int = 3, activation: ActSpec = None,
                 block_activation: ActSpec = None, insert_activation: ActSpec = None, bias: bool = True,
                 head: str = "pool") -> None:
        super().__init__()
        for name, val in (("in_channels", in_channels), ("d_out", d_out)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"ResidualCNN: {name} must be an int >= 1, got {val!r}")
        chans = _int_seq("channels", channels, 1)
        deps = _int_seq("depths", depths, 0)
        if len(chans) != len(deps):
            raise ValueError(f"ResidualCNN: channels and depths must have one entry per stage, got {len(chans)} "
                             f"channels {chans} and {len(deps)} depths {deps}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ResidualCNN: kernel_size must be an odd int >= 1 (same padding), got {kernel_size!r}")
        if head not in HEADS:
            raise ValueError(f"ResidualCNN: head must be one of {HEADS}, got {head!r}")
        self.in_channels, self.d_out, self.channels, self.head_kind = in_channels, d_out, chans, head
        self.kernel_size, self.bias = kernel_size, bool(bias)
        # the modules build the network (an unregistered activation instance works); their names
        # (activation_spec) go into config() and are only needed to save and rebuild
        act = get_activation(activation, default="tanh")
        blk_act = get_activation(block_activation)
        self._insert_module = blk_act if insert_activation is None else get_activation(insert_activation)
        self._act, self._block_act = activation_spec(act), activation_spec(blk_act)
        self._insert_act = activation_spec(self._insert_module)
        pad = kernel_size // 2
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], kernel_size, padding=pad), act)
        self.stages = nn.ModuleList(
            nn.Sequential(*(ResidualConvBlock(c, kernel_size, activation=blk_act, bias=self.bias)
                            for _ in range(depth)))
            for c, depth in zip(chans, deps)
        )
        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), get_activation(act))
            for a, b in zip(chans, chans[1:])
        )
        self.head = nn.Linear(chans[-1], d_out) if head == "pool" else nn.Conv2d(chans[-1], d_out, 1)

    def _run(self, h: Tensor, stage: int, index: int) -> Tensor:
        """Runs ``stages[stage][index:]``, every later stage and the head on ``h``."""
        for blk in self.stages[stage][index:]:
            h = blk(h)
        for i in range(stage + 1, len(self.stages)):
            h = self.stages[i](self.downsample[i - 1](h))
        if self.head_kind == "pixel":
            return self.head(h).flatten(1)
        return self.head(h.mean(dim=(-2, -1)))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> [B, d_out]`` (``[B, d_out * H' * W']`` with ``head="pixel"``)."""
        return self._run(self.stages[0](self.stem(x)), 0, len(self.stages[0]))

    def forward_from(self, point: Union[int, str], h: Tensor) -> Tensor:
        """Runs everything after candidate point ``point`` on its stream tensor ``h [B, C, H, W]``.

        ``h`` may hold several batches concatenated along dim 0 (every layer acts per sample).
        """
        site = site_at(self, point)
        for i, stage in enumerate(self.stages):
            if stage is site.container:
                return self._run(h, i, site.index)
        raise ValueError(f"ResidualCNN.forward_from: point must be a site of this model's stages, got {point!r}")

    def site_specs(self) -> List[SiteSpec]:
        """One ``conv`` site container per stage: ``"stages.0"``, ``"stages.1"``, ..."""
        return [SiteSpec(f"stages.{i}", "conv", {"channels": c, "kernel_size": self.kernel_size,
                                                 "activation": self._insert_module, "bias": self.bias,
                                                 "feature": "identity"})
                for i, c in enumerate(self.channels)]

    def new_block(self, point: Union[int, str]) -> nn.Module:
        """A zero-initialised block for candidate point ``point``, on this model's device and dtype."""
        all_sites = sites(self)
        names = [s.name for s in all_sites]
        if isinstance(point, str):
            if point not in names:
                raise ValueError(f"ResidualCNN.new_block: point must be a site name (one of {names}), got {point!r}")
        elif isinstance(point, bool) or not isinstance(point, int) or not 0 <= point < len(all_sites):
            raise ValueError(f"ResidualCNN.new_block: point must be an int in [0, {len(all_sites) - 1}] or a site "
                             f"name, got {point!r}")
        return site_at(self, point).new_block()

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments of the current architecture (current depths)."""
        cfg = {"in_channels": self.in_channels, "d_out": self.d_out, "channels": list(self.channels),
               "depths": [len(s) for s in self.stages], "kernel_size": self.kernel_size,
               "activation": self._act, "block_activation": self._block_act,
               "insert_activation": self._insert_act, "bias": self.bias}
        if self.head_kind != "pool":  # only when set: configs of pooled models are unchanged
            cfg["head"] = self.head_kind
        return cfg
