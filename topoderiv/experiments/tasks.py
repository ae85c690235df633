"""Built-in tasks: data generated in the package (no downloads), deterministic per seed.

Six tasks, all returned by :func:`get_task` as a :class:`Task` with a metric and a default model
(:attr:`ModelConfig.model`; :meth:`Task.build_model` builds any of ``"mlp"``, ``"cnn"``, ``"vit"``
for the data's shape):

``"heat"``
    The paper's parameter-field inversion for the heat equation (METHOD.md section 8), in 1-D:
    ``u_t = (kappa(x) u_x)_x + f(x)`` on ``(0, 1)``, ``u(0, t) = u(1, t) = 0``, ``u(x, 0) = u0(x)``.
    The parameter field ``m = log kappa`` is a mean-zero Gaussian random field (a truncated
    Karhunen-Loeve expansion on a cosine basis). The solution is observed, with Gaussian noise, at a
    few sensors and a few times; the network learns observations -> ``m`` on the cell midpoints of
    the grid. Test metric: the average relative L2 error ``mean_s ||m_pred - m|| / ||m||``
    (lower is better). The solver, :func:`heat_solve`, is a conservative second-order finite
    difference discretisation with implicit Euler time stepping, batched over fields.
``"digits"``
    scikit-learn's bundled 8x8 digits (1797 images, 10 classes; shipped with scikit-learn, no
    download). Cross-entropy; test metric: accuracy (higher is better).
``"regression"``
    A smooth function of two variables with a little noise. MSE; test metric: test MSE.
``"digits-images"`` (image task, default CNN)
    The digits as ``[N, 1, 8, 8]`` images (:func:`digits_images_task`); accuracy.
``"navier-stokes"`` (image task, field output, default ViT)
    The 2-D Navier-Stokes initial-vorticity inversion (:func:`navier_stokes_task`; solver in
    :mod:`topoderiv.experiments.navier_stokes`): noisy vorticity at time T -> initial vorticity on a
    32x32 grid; test metric: mean relative L2 error.
``"textures"`` (image task, default CNN)
    Synthetic: are two striped bands, a gap apart, of the same orientation? (:func:`textures_task`);
    accuracy. The CNN must be deep enough to see both bands: depth matters.

The first three tasks have vector inputs (the MLP only).

Every split is an ``(x, y)`` pair of tensors; :meth:`Task.loader` turns a split into a re-iterable
sequence of ``(x, y)`` mini-batches (reshuffled, deterministically, at every pass), the form the
training loop and the scorer take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Task",
    "ModelConfig",
    "MODEL_KINDS",
    "INSERT_KINDS",
    "Metric",
    "Batches",
    "get_task",
    "available_tasks",
    "heat_solve",
    "heat_task",
    "digits_task",
    "digits_images_task",
    "navier_stokes_task",
    "textures_task",
    "regression_task",
    "sample_log_kappa",
]

Split = Tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# containers


@dataclass(frozen=True)
class ModelConfig:
    """Default network and training budget of a task.

    Attributes:
        width: width of the residual stream of the MLP (``model="mlp"``).
        depth: number of residual blocks of the initial network (2, as in the paper); for a CNN
            the total over its stages (:meth:`Task.build_model`).
        lr: learning rate.
        batch_size: mini-batch size for training.
        epochs_per_round: epochs trained before the first insertion and after every insertion.
        rounds: growth rounds (insertions) at most. The total training budget of every method is
            ``epochs_per_round * (rounds + 1)`` epochs.
        max_depth: depth cap for growth.
        optimizer: ``"adam"`` (``torch.optim.Adam``) or ``"sgd"`` (``torch.optim.SGD`` with
            momentum 0.9), see :data:`OPTIMIZERS`.
        model: the task's default model kind, one of :data:`MODEL_KINDS`: ``"mlp"``
            (:class:`~topoderiv.models.ResidualMLP`), ``"cnn"`` (:class:`~topoderiv.models.ResidualCNN`)
            or ``"vit"`` (:class:`~topoderiv.models.ViT`); ``"cnn"``/``"vit"`` need an image task.
        channels: CNN channels per stage (one stage per entry, halving the resolution between
            stages; field-output tasks use one stage).
        embed_dim: ViT token width. patch_size: ViT patch size (divides the image size).
        num_heads: ViT attention heads (divides ``embed_dim``). mlp_ratio: ViT MLP hidden width /
            ``embed_dim``.
        block_activation: activation of the initial MLP/CNN blocks (a registered name, e.g.
            ``"relu"``); None = the model's default (:class:`~topoderiv.method.activations.TDActivation`).
            Blocks inserted by growth keep the admissible ``"td"`` either way.
    """

    width: int
    depth: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    epochs_per_round: int = 40
    rounds: int = 5
    max_depth: int = 12
    optimizer: str = "adam"
    model: str = "mlp"
    channels: Tuple[int, ...] = (16, 32)
    embed_dim: int = 32
    patch_size: int = 2
    num_heads: int = 2
    mlp_ratio: float = 2.0
    block_activation: Optional[str] = None

    def __post_init__(self) -> None:
        fn = "ModelConfig"
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{fn}: optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"{fn}: model must be one of {MODEL_KINDS}, got {self.model!r}")
        ch = self.channels
        if (isinstance(ch, (str, bytes)) or not isinstance(ch, (list, tuple)) or not ch
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in ch)):
            raise ValueError(f"{fn}: channels must be a non-empty tuple of ints >= 1, got {ch!r}")
        object.__setattr__(self, "channels", tuple(int(c) for c in ch))  # a list (JSON budget) -> tuple
        for name in ("width", "depth", "embed_dim", "patch_size", "num_heads"):
            val, lo = getattr(self, name), 0 if name == "depth" else 1
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {val!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{fn}: num_heads must divide embed_dim = {self.embed_dim}, got {self.num_heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
                and self.mlp_ratio > 0):
            raise ValueError(f"{fn}: mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
        if self.block_activation is not None:
            from ..method.activations import ACTIVATIONS

            if self.block_activation not in ACTIVATIONS:
                raise ValueError(f"{fn}: block_activation must be None or one of {sorted(ACTIVATIONS)}, got "
                                 f"{self.block_activation!r}")

    @property
    def total_epochs(self) -> int:
        """The training budget every method gets: ``epochs_per_round * (rounds + 1)``."""
        return self.epochs_per_round * (self.rounds + 1)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The optimiser of this budget over ``params``."""
        return OPTIMIZERS[self.optimizer](params, self.lr)

    def describe_optimizer(self) -> str:
        """E.g. ``"Adam lr 0.001"``."""
        return f"{'Adam' if self.optimizer == 'adam' else 'SGD (momentum 0.9)'} lr {self.lr:g}"


#: model kinds :meth:`Task.build_model` builds
MODEL_KINDS = ("mlp", "cnn", "vit")

#: site kinds ``insert`` may name per model kind (the first is the default)
INSERT_KINDS = {
    "mlp": ("linear",),
    "cnn": ("conv",),
    "vit": ("transformer_block", "tokens", "mlp_block", "attention_block"),
}

#: optimisers a :class:`ModelConfig` can name: ``name -> f(params, lr)``
OPTIMIZERS = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
}


@dataclass(frozen=True)
class Metric:
    """A test metric: ``fn(pred [N, d_out], y) -> 0-dim tensor``, a MEAN over samples (so a
    batch-size-weighted average over batches is the metric of the whole split, and ``fn`` can be
    passed wherever a batch-mean loss is expected, e.g. :func:`topoderiv.training.evaluate`).
    Calling the metric returns a float."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    higher_is_better: bool = False

    def __call__(self, pred: Tensor, y: Tensor) -> float:
        return float(self.fn(pred, y))


class Batches:
    """A re-iterable sequence of ``(x, y)`` mini-batches over one split.

    Every ``iter()`` is one pass (an epoch). With ``shuffle=True`` each pass draws a new
    permutation from a private generator seeded with ``seed``, so a run is reproducible and
    independent of the global RNG. The permutation is drawn when ``iter()`` is called.

    :meth:`state_dict` / :meth:`load_state_dict` save and restore the data order (the generator's
    state and the number of passes started), so a resumed run (:meth:`topoderiv.Grower.from_checkpoint`)
    sees the same batches as the interrupted one. The state is taken between passes: a pass in
    progress is not resumed in the middle.

    Args:
        x: inputs ``[N, d_in]``.
        y: targets ``[N, ...]``, same ``N``.
        batch_size: batch size (the last batch may be smaller); ``None`` = one batch.
        shuffle: reshuffle at every pass.
        seed: seed of the shuffling generator.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: Optional[int] = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"Batches: x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"Batches: batch_size must be >= 1 or None, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = x.shape[0] if batch_size is None else int(batch_size)
        self.shuffle = shuffle
        self.epoch = 0  # passes started
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, math.ceil(self.x.shape[0] / self.batch_size))

    def __iter__(self) -> Iterator[Split]:
        n = self.x.shape[0]
        self.epoch += 1
        # drawn now, not at the first batch: the generator's state always falls between passes
        perm = torch.randperm(n, generator=self._gen).to(self.x.device) if self.shuffle else None
        return self._batches(n, perm)

    def _batches(self, n: int, perm: Optional[Tensor]) -> Iterator[Split]:
        for i in range(0, n, self.batch_size):
            if perm is None:
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            else:
                idx = perm[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]

    def state_dict(self) -> Dict[str, object]:
        """``{"generator": uint8 tensor, "epoch": passes started, "n", "batch_size", "shuffle"}``."""
        return {"generator": self._gen.get_state(), "epoch": self.epoch, "n": int(self.x.shape[0]),
                "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores the data order saved by :meth:`state_dict` (the next pass is the one that followed).

        Raises:
            TypeError: ``state`` is not such a dict. ValueError: it was saved by a loader with another
                number of samples, batch size or shuffling (the order would not be the same).
        """
        fn = "Batches.load_state_dict"
        if not isinstance(state, dict) or not isinstance(state.get("generator"), Tensor):
            raise TypeError(f"{fn}: state must be a dict from Batches.state_dict() (with a 'generator' tensor), got "
                            f"{type(state).__name__}")
        mine = self.state_dict()
        for key in ("n", "batch_size", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"{fn}: state must come from a loader with the same n, batch_size and shuffle, got "
                                 f"{key} {state[key]!r} in the state, this loader's {mine[key]!r}")
        self._gen.set_state(state["generator"].to("cpu", torch.uint8))
        self.epoch = int(state.get("epoch", 0))

    def __repr__(self) -> str:
        return f"Batches(n={self.x.shape[0]}, batch_size={self.batch_size}, shuffle={self.shuffle})"


@dataclass
class Task:
    """A learning problem with its data, loss, test metric and default network.

    Attributes:
        name: task name.
        train, val, test: ``(x, y)`` tensors: ``x [N, d_in]`` (vector tasks) or ``x [N, C, H, W]``
            (image tasks, ``in_shape = (C, H, W)``), float32; ``y [N, d_out]`` float32 (regression;
            a field target is flattened channel-major, ``d_out = C' * H * W``) or ``[N]`` int64
            (classification, ``d_out`` classes).
        loss_fn: ``loss_fn(output [N, d_out], y) -> scalar`` (mean over samples).
        metric: the test metric (:class:`Metric`).
        d_in, d_out: input and output sizes of the network (``d_in = C * H * W`` for an image
            task: what an MLP reads after flattening).
        config: default network and budget (:class:`ModelConfig`, with the default model kind).
        seed: the data seed.
        info: task-specific description (grid, sensors, noise level, ...), JSON-serialisable.
        in_shape: ``(C, H, W)`` of an image task's inputs; None for vector inputs.
        out_shape: ``(C', H, W)`` when the output is a field on the input grid (``y`` holds it
            flattened); None for class scores / vector outputs.
    """

    name: str
    train: Split
    val: Split
    test: Split
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: Metric
    d_in: int
    d_out: int
    config: ModelConfig
    seed: int = 0
    info: Dict[str, object] = field(default_factory=dict)
    in_shape: Optional[Tuple[int, int, int]] = None
    out_shape: Optional[Tuple[int, int, int]] = None

    def split(self, name: str) -> Split:
        """The ``(x, y)`` tensors of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"Task.split: name must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)

    def loader(
        self, split: str = "train", batch_size: Optional[int] = None, *, shuffle: Optional[bool] = None, seed: int = 0
    ) -> Batches:
        """Mini-batches of a split. Defaults: the task's batch size and shuffling for ``"train"``,
        one full batch without shuffling for ``"val"``/``"test"``."""
        x, y = self.split(split)
        if split == "train":
            bs = self.config.batch_size if batch_size is None else batch_size
            sh = True if shuffle is None else shuffle
        else:
            bs, sh = batch_size, bool(shuffle)
        return Batches(x, y, bs, shuffle=sh, seed=seed)

    def to(self, device: Union[str, torch.device]) -> "Task":
        """A copy with every split on ``device``."""
        mv = lambda s: (s[0].to(device), s[1].to(device))  # noqa: E731
        return replace(self, train=mv(self.train), val=mv(self.val), test=mv(self.test))

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, split: str = "test", batch_size: int = 4096) -> Tensor:
        """Model outputs on a split (eval mode, no grad; the model's mode is restored)."""
        x, _ = self.split(split)
        was_training = model.training
        model.eval()
        try:
            outs = [model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_out)

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> Dict[str, float]:
        """``{"loss": ..., metric.name: ...}`` of ``model`` on a split."""
        _, y = self.split(split)
        pred = self.predict(model, split)
        return {"loss": float(self.loss_fn(pred, y)), self.metric.name: self.metric(pred, y)}

    def build_model(
        self,
        depth: Optional[int] = None,
        *,
        width: Optional[int] = None,
        seed: Optional[int] = None,
        model: Optional[str] = None,
        insert: Optional[str] = None,
        config: Optional[ModelConfig] = None,
        **kwargs,
    ) -> torch.nn.Module:
        """The task's network of kind ``model``, initialised from ``torch.manual_seed(seed)`` when a
        seed is given.

        Args:
            depth: residual blocks of the initial network (default ``config.depth``). A CNN
                spreads them over its stages, the first stages taking one more when they do not
                divide evenly (depth 3 over 2 stages: ``depths = (2, 1)``).
            width: the stream width of the chosen kind: the MLP's ``width``, the CNN's first-stage
                channels (later stages keep their ratio to it), the ViT's ``embed_dim``. Default:
                the config's field of that kind (``width`` / ``channels`` / ``embed_dim``).
            seed: ``torch.manual_seed(seed)`` before building (None: the global RNG as it is).
            model: one of :data:`MODEL_KINDS` (default ``config.model``, the task's own):

                * ``"mlp"``: :class:`~topoderiv.models.ResidualMLP` ``(d_in, width, d_out, depth)``;
                  on an image task it flattens ``x [N, C, H, W]`` first (``flatten=True``).
                * ``"cnn"`` (image tasks): :class:`~topoderiv.models.ResidualCNN` with
                  ``config.channels``; classes are read by global pooling + a linear head, a field
                  output (``out_shape``) by a 1x1 convolution at every pixel (``head="pixel"``,
                  one stage at full resolution; the output flattened like ``y``).
                * ``"vit"`` (image tasks): :class:`~topoderiv.models.ViT` with ``config``'s
                  ``patch_size``, ``embed_dim``, ``num_heads``, ``mlp_ratio``; classes from the
                  class token, a field output from a per-patch linear head unpatchified
                  (``output="field"``).
            insert: the site kind growth inserts, one of ``INSERT_KINDS[model]``: ``"linear"``
                (mlp), ``"conv"`` (cnn), ``"transformer_block"`` (vit default), ``"tokens"``,
                ``"mlp_block"`` or ``"attention_block"`` (vit). Default: the first.
            config: the :class:`ModelConfig` to read the sizes from (default ``self.config``); pass
                a budget's config (e.g. :func:`topoderiv.experiments.compare.make_budget`'s) so its
                overrides apply.
            **kwargs: passed to the model's constructor (e.g. activations, ``kernel_size``,
                ``global_pool``). ``config.block_activation``, when set, is passed to an MLP or CNN as
                ``block_activation`` with ``insert_activation="td"`` (unless given here).

        Returns:
            the model; its ``forward(x)`` returns ``[N, d_out]`` (what ``loss_fn`` and ``metric`` take).

        Raises:
            ValueError: an unknown model or insert kind, a CNN/ViT on a task without images, a CNN
                with several stages on a field-output task, sizes the model rejects.
        """
        from ..models import ResidualCNN, ResidualMLP, ViT

        fn = "Task.build_model"
        cfg = self.config if config is None else config
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"{fn}: config must be a ModelConfig or None, got {type(cfg).__name__}")
        kind = cfg.model if model is None else model
        if kind not in MODEL_KINDS:
            raise ValueError(f"{fn}: model must be one of {MODEL_KINDS}, got {kind!r}")
        if insert is not None and insert not in INSERT_KINDS[kind]:
            raise ValueError(f"{fn}: insert must be one of {INSERT_KINDS[kind]} for model {kind!r}, got {insert!r}")
        depth = cfg.depth if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"{fn}: depth must be an int >= 0, got {depth!r}")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise ValueError(f"{fn}: width must be None or an int >= 1, got {width!r}")
        if kind != "mlp" and self.in_shape is None:
            raise ValueError(f"{fn}: model {kind!r} needs an image task (x [N, C, H, W]); task {self.name!r} has "
                             f"x [N, {self.d_in}]: use model 'mlp'")
        if seed is not None:
            torch.manual_seed(seed)
        if kind != "vit" and cfg.block_activation is not None and "block_activation" not in kwargs:
            kwargs["block_activation"] = cfg.block_activation
            kwargs.setdefault("insert_activation", "td")
        if kind == "mlp":
            if self.in_shape is not None:
                kwargs.setdefault("flatten", True)
            return ResidualMLP(self.d_in, cfg.width if width is None else width, self.d_out, depth, **kwargs)
        c_in, h, w = self.in_shape
        field_out = self.out_shape is not None
        n_out = self.out_shape[0] if field_out else self.d_out
        if kind == "cnn":
            chans = cfg.channels
            if width is not None:
                chans = tuple(max(1, round(c * width / chans[0])) for c in chans)
            if field_out and len(chans) != 1:
                raise ValueError(f"{fn}: a field output needs a CNN with one stage (full resolution), got channels "
                                 f"{chans}")
            k = len(chans)
            depths = [depth // k + (1 if i < depth % k else 0) for i in range(k)]
            if field_out:
                kwargs.setdefault("head", "pixel")
            return ResidualCNN(c_in, n_out, chans, depths, **kwargs)
        if field_out:
            kwargs.setdefault("output", "field")
        return ViT((h, w), cfg.patch_size, c_in, n_out, cfg.embed_dim if width is None else width, depth,
                   cfg.num_heads, cfg.mlp_ratio, insert=insert or INSERT_KINDS["vit"][0], **kwargs)


# --------------------------------------------------------------------------------------------
# heat equation: solver and parameter fields


def heat_solve(
    kappa: Tensor,
    *,
    t_final: float,
    steps: int,
    u0: Optional[Union[Tensor, Callable[[Tensor], Tensor]]] = None,
    source: Optional[Union[Tensor, Callable[[Tensor, float], Tensor]]] = None,
    save_steps: Optional[Sequence[int]] = None,
) -> Tensor:
    """Solves ``u_t = (kappa(x) u_x)_x + f(x, t)`` on ``(0, 1)`` with ``u(0) = u(1) = 0``.

    Space: ``N`` uniform cells of width ``h = 1/N``, unknowns at the ``N - 1`` interior nodes
    ``x_i = i h``, conductivity given on the cell midpoints, conservative flux differences

        (A u)_i = (kappa_{i+1/2} (u_{i+1} - u_i) - kappa_{i-1/2} (u_i - u_{i-1})) / h^2

    (second order in ``h`` for smooth ``kappa``). Time: implicit Euler (first order in ``dt``,
    unconditionally stable): ``(I - dt A) u^{n+1} = u^n + dt f(t_{n+1})``. The tridiagonal system is
    factorised once per field (the Thomas algorithm, vectorised over the batch) and reused at every
    step.

    Args:
        kappa: conductivity at the cell midpoints ``[B, N]`` (or ``[N]``), positive; float32/64.
            The solve runs in float64.
        t_final: final time (> 0).
        steps: number of time steps (>= 1), ``dt = t_final / steps``.
        u0: initial state: ``[N - 1]`` or ``[B, N - 1]`` at the interior nodes, or a callable of
            the interior node coordinates ``x [N - 1]``; default zero.
        source: ``f``: ``[N - 1]`` / ``[B, N - 1]`` constant in time, or a callable ``f(x, t)``
            returning either shape; default zero.
        save_steps: time-step indices to return (0 = the initial state); default all
            ``0 .. steps``.

    Returns:
        ``u [B, len(save_steps), N - 1]`` float64 at the interior nodes (``[len, N - 1]`` when
        ``kappa`` was 1-D).
    """
    fn = "heat_solve"
    if not isinstance(kappa, Tensor):
        raise TypeError(f"{fn}: kappa must be a torch.Tensor, got {type(kappa).__name__}")
    squeeze = kappa.dim() == 1
    k = kappa.detach().to(torch.float64)
    if squeeze:
        k = k[None]
    if k.dim() != 2 or k.shape[1] < 2:
        raise ValueError(f"{fn}: kappa must have shape [B, N] or [N] with N >= 2, got {tuple(kappa.shape)}")
    if not bool((k > 0).all()) or not bool(torch.isfinite(k).all()):
        raise ValueError(f"{fn}: kappa must be finite and positive everywhere")
    if not (t_final > 0):
        raise ValueError(f"{fn}: t_final must be > 0, got {t_final}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{fn}: steps must be an int >= 1, got {steps!r}")
    B, N = k.shape
    n = N - 1
    h = 1.0 / N
    dt = t_final / steps
    x = torch.arange(1, N, dtype=torch.float64, device=k.device) * h  # [n]
    save = list(range(steps + 1)) if save_steps is None else [int(s) for s in save_steps]
    if any(s < 0 or s > steps for s in save):
        raise ValueError(f"{fn}: save_steps must lie in 0..{steps}, got {save}")

    def _field(v, name: str, t: Optional[float]) -> Tensor:
        if v is None:
            return torch.zeros(B, n, dtype=torch.float64, device=k.device)
        if callable(v):
            v = v(x) if t is None else v(x, t)
        v = torch.as_tensor(v, dtype=torch.float64, device=k.device)
        if v.shape not in ((n,), (B, n)):
            raise ValueError(f"{fn}: {name} must have shape [{n}] or [{B}, {n}], got {tuple(v.shape)}")
        return v.expand(B, n)

    # (I - dt A): sub-diagonal a, diagonal b, super-diagonal c (a[:, 0], c[:, -1] unused)
    r = dt / (h * h)
    kl, kr = k[:, :-1], k[:, 1:]  # kappa_{i-1/2}, kappa_{i+1/2} for node i = 1..n
    a = -r * kl
    b = 1.0 + r * (kl + kr)
    c = -r * kr
    # Thomas factorisation, once: denom_i = b_i - a_i c'_{i-1}; c'_i = c_i / denom_i
    denom = torch.empty_like(b)
    cp = torch.empty_like(b)
    denom[:, 0] = b[:, 0]
    cp[:, 0] = c[:, 0] / denom[:, 0]
    for i in range(1, n):
        denom[:, i] = b[:, i] - a[:, i] * cp[:, i - 1]
        cp[:, i] = c[:, i] / denom[:, i]

    def _solve(d: Tensor) -> Tensor:
        dp = torch.empty_like(d)
        dp[:, 0] = d[:, 0] / denom[:, 0]
        for i in range(1, n):
            dp[:, i] = (d[:, i] - a[:, i] * dp[:, i - 1]) / denom[:, i]
        out = torch.empty_like(d)
        out[:, -1] = dp[:, -1]
        for i in range(n - 2, -1, -1):
            out[:, i] = dp[:, i] - cp[:, i] * out[:, i + 1]
        return out

    u = _field(u0, "u0", None).clone()
    const_f = None if callable(source) else _field(source, "source", None)
    frames: Dict[int, Tensor] = {0: u.clone()} if 0 in save else {}
    last = max(save) if save else 0
    for step in range(1, last + 1):
        f = _field(source, "source", step * dt) if callable(source) else const_f
        u = _solve(u + dt * f)
        if step in save:
            frames[step] = u.clone()
    out = torch.stack([frames[s] for s in save], dim=1)  # [B, T, n]
    return out[0] if squeeze else out


def _kl_basis(points: Tensor, modes: int) -> Tensor:
    """Cosine Karhunen-Loeve basis ``sqrt(2) cos(j pi x)``, ``j = 1..modes``: ``[len(points), modes]``."""
    j = torch.arange(1, modes + 1, dtype=torch.float64)
    return math.sqrt(2.0) * torch.cos(math.pi * points[:, None].to(torch.float64) * j[None])


def _kl_sqrt_eigs(modes: int, sigma: float, decay: float) -> Tensor:
    """Square roots of the KL eigenvalues ``lambda_j ~ j^-decay``, scaled so the pointwise
    variance of the field averages ``sigma^2`` over the domain."""
    j = torch.arange(1, modes + 1, dtype=torch.float64)
    lam = j ** (-decay)
    lam = lam * (sigma**2 / lam.sum())
    return lam.sqrt()


def sample_log_kappa(
    n: int,
    points: Tensor,
    *,
    modes: int = 8,
    sigma: float = 0.6,
    decay: float = 2.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Draws ``n`` mean-zero Gaussian random fields ``m(x) = sum_j sqrt(lambda_j) xi_j sqrt(2) cos(j pi x)``.

    Args:
        n: number of fields.
        points: where to evaluate them ``[P]`` (float64 coordinates in ``[0, 1]``).
        modes: number of KL modes ``J``.
        sigma: domain-averaged pointwise standard deviation.
        decay: ``lambda_j ~ j^-decay`` (larger = smoother).
        generator: torch generator for ``xi ~ N(0, I)``.

    Returns:
        ``(m [n, P], xi [n, J])``, float64.
    """
    xi = torch.randn(n, modes, generator=generator, dtype=torch.float64)
    coef = xi * _kl_sqrt_eigs(modes, sigma, decay)
    return coef @ _kl_basis(points, modes).T, xi


def heat_task(
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    cells: int = 32,
    sensors: int = 8,
    times: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
    steps: int = 40,
    modes: int = 8,
    sigma: float = 0.7,
    decay: float = 1.5,
    noise: float = 0.005,
    config: Optional[ModelConfig] = None,
) -> Task:
    """The heat-equation parameter-field inversion (see the module docstring).

    Set-up: ``u0(x) = sin(pi x)``, a steady source ``f(x) = 10 exp(-(x - 0.7)^2 / 0.02)``,
    ``t_final = max(times)`` in ``steps`` implicit-Euler steps on ``cells`` cells. ``sensors``
    equally spaced interior sensors observe ``u`` at each of ``times`` (snapped to the time grid),
    so ``d_in = sensors * len(times)``. Noise: i.i.d. Gaussian with standard deviation ``noise``
    times the RMS of the clean training observations. Inputs are standardised with training
    statistics. Target: ``m = log kappa`` at the ``cells`` midpoints (``d_out = cells``).

    Args:
        seed: data seed (fields and noise).
        n_train, n_val, n_test: split sizes.
        cells: grid cells ``N`` (also the output size).
        sensors: number of sensors.
        times: observation times.
        steps: time steps up to ``max(times)``.
        modes, sigma, decay: the random field (:func:`sample_log_kappa`).
        noise: relative observation noise.
        config: network/budget override.
    """
    if sensors < 1 or sensors > cells - 1:
        raise ValueError(f"heat_task: sensors must be in 1..{cells - 1}, got {sensors}")
    if not times or min(times) <= 0:
        raise ValueError(f"heat_task: times must be non-empty and positive, got {tuple(times)}")
    gen = torch.Generator().manual_seed(int(seed))
    n_all = n_train + n_val + n_test
    h = 1.0 / cells
    mid = (torch.arange(cells, dtype=torch.float64) + 0.5) * h
    m, _ = sample_log_kappa(n_all, mid, modes=modes, sigma=sigma, decay=decay, generator=gen)
    t_final = float(max(times))
    save = sorted({max(1, round(t / t_final * steps)) for t in times})
    u = heat_solve(
        m.exp(),
        t_final=t_final,
        steps=steps,
        u0=lambda x: torch.sin(math.pi * x),
        source=lambda x, t: 10.0 * torch.exp(-((x - 0.7) ** 2) / 0.02),
        save_steps=save,
    )  # [n_all, T, cells - 1]
    # sensor nodes: equally spaced interior node indices (0-based among the cells - 1 interior nodes)
    nodes = torch.linspace(1, cells - 1, sensors + 2)[1:-1].round().long() - 1
    obs = u[:, :, nodes].reshape(n_all, -1)  # [n_all, T * sensors]
    scale = obs[:n_train].pow(2).mean().sqrt()
    obs = obs + noise * scale * torch.randn(obs.shape, generator=gen, dtype=torch.float64)
    mean, std = obs[:n_train].mean(0), obs[:n_train].std(0).clamp_min(1e-12)
    xs = ((obs - mean) / std).float()
    ys = m.float()
    cfg = config or ModelConfig(width=32, depth=2, lr=1e-3, batch_size=64, epochs_per_round=100, rounds=5, max_depth=10)
    info = {
        "equation": "u_t = (kappa u_x)_x + f on (0,1), u(0)=u(1)=0, u0 = sin(pi x), f = 10 exp(-(x-0.7)^2/0.02)",
        "target": "m = log kappa at the cell midpoints",
        "cells": cells,
        "sensor_x": [float((i + 1) * h) for i in nodes.tolist()],
        "times": [s * t_final / steps for s in save],
        "steps": steps,
        "modes": modes,
        "sigma": sigma,
        "decay": decay,
        "noise": noise,
    }
    return _make_task("heat", xs, ys, n_train, n_val, metric="rel_l2", config=cfg, seed=seed, info=info)


def _relative_l2(pred: Tensor, y: Tensor) -> Tensor:
    """Average over samples of ``||pred_s - y_s|| / ||y_s||`` (float64 0-dim tensor)."""
    pred, y = pred.detach().double(), y.detach().double()
    return ((pred - y).norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)).mean()


def _split3(x: Tensor, y: Tensor, n_train: int, n_val: int) -> List[Split]:
    a, b = n_train, n_train + n_val
    return [(x[:a].contiguous(), y[:a].contiguous()), (x[a:b].contiguous(), y[a:b].contiguous()), (x[b:].contiguous(), y[b:].contiguous())]


def _accuracy(pred: Tensor, y: Tensor) -> Tensor:
    return (pred.detach().argmax(dim=1) == y).double().mean()


def _mse(pred: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(pred.detach().double(), y.detach().double())


# loss and test metric of each kind of target
_OBJECTIVES: Dict[str, Tuple[Callable[[Tensor, Tensor], Tensor], Metric]] = {
    "accuracy": (F.cross_entropy, Metric("accuracy", _accuracy, higher_is_better=True)),
    "rel_l2": (F.mse_loss, Metric("rel_l2", _relative_l2, higher_is_better=False)),
    "mse": (F.mse_loss, Metric("mse", _mse, higher_is_better=False)),
}


def _make_task(
    name: str,
    x: Tensor,
    y: Tensor,
    n_train: int,
    n_val: int,
    *,
    metric: str,
    config: ModelConfig,
    seed: int,
    info: Dict[str, object],
    classes: Optional[int] = None,
    out_shape: Optional[Tuple[int, int, int]] = None,
) -> Task:
    """The :class:`Task` of the data ``x, y`` split ``n_train / n_val / rest``, with the loss and
    metric of ``_OBJECTIVES[metric]``. ``d_in`` is read from ``x`` (an image task's ``x [N, C, H, W]``
    also gives ``in_shape``); ``d_out`` is ``classes`` for class labels, else ``y.shape[1]``."""
    loss_fn, met = _OBJECTIVES[metric]
    train, val, test = _split3(x, y, n_train, n_val)
    return Task(
        name=name,
        train=train,
        val=val,
        test=test,
        loss_fn=loss_fn,
        metric=met,
        d_in=math.prod(x.shape[1:]),
        d_out=y.shape[1] if classes is None else classes,
        config=config,
        seed=int(seed),
        info=info,
        in_shape=tuple(x.shape[1:]) if x.dim() == 4 else None,
        out_shape=out_shape,
    )


def _check_sizes(fn: str, noise: float, **sizes: int) -> None:
    """Raises ValueError unless every split size is an int >= 1 and ``noise >= 0``."""
    for name, val in sizes.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {val!r}")
    if not noise >= 0:
        raise ValueError(f"{fn}: noise must be >= 0, got {noise}")


def _digits(fn: str, seed: int, n_train: int, n_val: int, images: bool) -> Tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits, permuted with ``seed``: ``x`` float64 (``[1797, 64]``, or
    ``[1797, 1, 8, 8]`` with ``images``) and ``y [1797]`` int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float64)[:, None] if images else torch.as_tensor(d.data, dtype=torch.float64)
    y = torch.as_tensor(d.target, dtype=torch.long)
    if n_train < 1 or n_val < 1 or n_train + n_val >= x.shape[0]:
        raise ValueError(f"{fn}: n_train, n_val must be >= 1 with n_train + n_val < {x.shape[0]}, got "
                         f"{n_train} and {n_val}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    return x[perm], y[perm]


# --------------------------------------------------------------------------------------------
# digits and regression


def digits_task(
    *, seed: int = 0, n_train: int = 1000, n_val: int = 300, config: Optional[ModelConfig] = None
) -> Task:
    """scikit-learn's 8x8 digits (bundled with scikit-learn; no download).

    The 1797 images are permuted with ``seed`` and split ``n_train / n_val / rest``; pixels are
    standardised with training statistics. Cross-entropy; test metric: accuracy.
    """
    x, y = _digits("digits_task", seed, n_train, n_val, images=False)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0)
    x = ((x - mean) / torch.where(std > 1e-8, std, torch.ones_like(std))).float()
    cfg = config or ModelConfig(width=32, depth=2, lr=1e-3, batch_size=64, epochs_per_round=15, rounds=4, max_depth=8)
    return _make_task("digits", x, y, n_train, n_val, metric="accuracy", classes=10, config=cfg, seed=seed,
                      info={"source": "sklearn.datasets.load_digits", "classes": 10})


def digits_images_task(
    *, seed: int = 0, n_train: int = 1000, n_val: int = 300, config: Optional[ModelConfig] = None
) -> Task:
    """scikit-learn's 8x8 digits as images ``x [N, 1, 8, 8]`` (the ``"digits"`` task's data and split).

    The 1797 images are permuted with ``seed`` and split ``n_train / n_val / rest``; pixels are
    standardised with ONE mean and standard deviation over all training pixels (so the image stays
    an image: no per-pixel scaling). Cross-entropy; test metric: accuracy. Default model: the
    residual CNN (channels 16 at 8x8, 32 at 4x4; :meth:`Task.build_model` ``model="cnn"``); a ViT
    with 2x2 patches (16 patches, ``embed_dim`` 32, 2 heads) or the MLP on the flattened image
    (width 32) on request.
    """
    x, y = _digits("digits_images_task", seed, n_train, n_val, images=True)  # x [1797, 1, 8, 8]
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = ((x - mean) / std).float()
    cfg = config or ModelConfig(width=32, depth=2, lr=2e-3, batch_size=64, epochs_per_round=8, rounds=4, max_depth=8,
                                model="cnn", channels=(16, 32), embed_dim=32, patch_size=2, num_heads=2,
                                mlp_ratio=2.0)
    return _make_task("digits-images", x, y, n_train, n_val, metric="accuracy", classes=10, config=cfg, seed=seed,
                      info={"source": "sklearn.datasets.load_digits (images)", "classes": 10, "image": [1, 8, 8],
                            "pixel_mean": float(mean), "pixel_std": float(std)})


def navier_stokes_task(
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 200,
    n_test: int = 200,
    size: int = 32,
    t_final: float = 5.0,
    dt: float = 0.1,
    nu: float = 1e-3,
    noise: float = 0.01,
    config: Optional[ModelConfig] = None,
) -> Task:
    """The 2-D Navier-Stokes initial-vorticity inversion: vorticity at time ``T`` -> initial vorticity.

    Forward model (:mod:`topoderiv.experiments.navier_stokes`, the benchmark of Li et al.): the
    vorticity equation ``w_t + u . grad w = nu lap w + f`` on the periodic unit square with
    ``f = 0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))``, initial vorticity ``w0`` from the Gaussian
    random field ``N(0, 7^{3/2} (-lap + 49 I)^{-2.5})`` on a ``size x size`` grid, integrated to
    ``t_final`` with ``t_final / dt`` Crank-Nicolson/Heun steps of the pseudo-spectral solver
    (float32, batched; at the defaults the time-discretisation error is ~3e-5 relative, far below
    the noise, and generating the 1400 fields takes a few seconds on one CPU core).

    Input: the full field ``w(T)`` plus i.i.d. Gaussian noise of standard deviation ``noise`` times
    the RMS of the clean training fields, minus the training mean field (which holds the forced,
    deterministic part), divided by one scalar (the training RMS of that): ``x [N, 1, size, size]``.
    Target: ``w0`` divided by its training RMS (one scalar, so the metric is unchanged), flattened:
    ``y [N, size * size]``, ``out_shape = (1, size, size)``. Loss: MSE; test metric: the mean
    relative L2 error ``mean_s ||w0_pred - w0|| / ||w0||`` (predicting zero scores 1). Default
    model: a ViT with 4x4 patches (64 tokens, ``embed_dim`` 64, 4 heads) and a per-patch linear
    head unpatchified to the field (``output="field"``): attention reaches across the box, as the
    inversion of transport needs. On request (:meth:`Task.build_model`): the residual CNN at full
    resolution with a per-pixel 1x1 head (one stage of 16 channels, zero padding: its receptive
    field grows by 2 pixels per block), or the MLP (width 256) on the flattened field.

    Args:
        seed: data seed (fields and noise). n_train, n_val, n_test: split sizes.
        size: grid points per side (32 by default; 64 works, at four times the cost).
        t_final: observation time ``T``. dt: solver time step (``t_final / dt`` must be an integer).
        nu: viscosity. noise: relative observation noise.
        config: network/budget override.
    """
    from .navier_stokes import ns_solve, sample_vorticity

    fn = "navier_stokes_task"
    _check_sizes(fn, noise, n_train=n_train, n_val=n_val, n_test=n_test)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"{fn}: size must be an int >= 8, got {size!r}")
    if not (t_final > 0 and dt > 0):
        raise ValueError(f"{fn}: t_final and dt must be > 0, got t_final={t_final}, dt={dt}")
    steps = round(t_final / dt)
    if steps < 1 or abs(steps * dt - t_final) > 1e-9 * max(1.0, t_final):
        raise ValueError(f"{fn}: t_final / dt must be a positive integer, got t_final={t_final}, dt={dt}")
    gen = torch.Generator().manual_seed(int(seed))
    n_all = n_train + n_val + n_test
    w0 = sample_vorticity(n_all, size, generator=gen)  # float64
    wt = ns_solve(w0.float(), t_final=float(t_final), steps=steps, nu=nu, forcing="li")[:, -1].double()
    scale = wt[:n_train].pow(2).mean().sqrt()
    obs = wt + noise * scale * torch.randn(wt.shape, generator=gen, dtype=torch.float64)
    mean_field = obs[:n_train].mean(0)
    obs = obs - mean_field
    x_scale = obs[:n_train].pow(2).mean().sqrt()
    y_scale = w0[:n_train].pow(2).mean().sqrt()
    xs = (obs / x_scale).float()[:, None]
    ys = (w0 / y_scale).float().reshape(n_all, -1)
    cfg = config or ModelConfig(width=256, depth=2, lr=2e-3, batch_size=32, epochs_per_round=10, rounds=4, max_depth=8,
                                model="vit", channels=(16,), embed_dim=64, patch_size=4, num_heads=4, mlp_ratio=2.0)
    info = {
        "equation": "w_t + u.grad w = nu lap w + f on [0,1]^2 periodic, u = (psi_y, -psi_x), -lap psi = w",
        "forcing": "f = 0.1 (sin(2 pi (x+y)) + cos(2 pi (x+y)))",
        "initial_field": "w0 ~ N(0, 7^{3/2} (-lap + 49 I)^{-2.5}), zero mean",
        "solver": "Fourier pseudo-spectral, 2/3 dealiasing, Crank-Nicolson (viscous) + Heun (advection, "
                  "forcing), float32",
        "input": "w(T) + noise, minus the training mean field, / x_scale; [N, 1, size, size]",
        "target": "w0 / y_scale, flattened [N, size*size]",
        "metric": "mean relative L2 error of w0",
        "size": size,
        "nu": nu,
        "t_final": float(t_final),
        "dt": float(dt),
        "steps": steps,
        "noise": noise,
        "x_scale": float(x_scale),
        "y_scale": float(y_scale),
        "samples": {"train": n_train, "val": n_val, "test": n_test},
    }
    return _make_task("navier-stokes", xs, ys, n_train, n_val, metric="rel_l2", config=cfg, seed=seed, info=info,
                      out_shape=(1, size, size))


def textures_task(
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    size: int = 16,
    gap: int = 6,
    noise: float = 0.3,
    config: Optional[ModelConfig] = None,
) -> Task:
    """A synthetic image task whose label composes two features far apart: depth matters.

    Every ``size x size`` image has a textured band on the left and one on the right, each
    ``(size - gap) // 2`` columns wide, separated by ``gap`` columns of background; each band is
    striped horizontally or vertically (period 2, contrast 0.75 to 1.25), and Gaussian noise of
    standard deviation ``noise`` covers the image. Label: 1 when the two bands have the same
    orientation, 0 otherwise (balanced: the four orientation pairs are equally likely).

    Why depth matters: a feature whose receptive field sees only one band contributes, after global
    average pooling, an additive ``a(left) + b(right)``, and no function of such a sum (let alone the
    linear head) is the XOR of the two orientations. The network must see both bands at once, across
    the gap, and a one-stage residual CNN's receptive field is ``3 + 2 * depth`` pixels: with the
    default gap 6 it must reach 8 columns, so the initial CNN (2 blocks, receptive field 7) is at
    chance and depth >= 3 can solve the task. The default CNN has ReLU blocks
    (``block_activation="relu"``): blocks of the TD activation start in its quadratic regime and
    did not leave the task's saddle (XOR has no first-order signal) within the budget even at depth
    6; blocks inserted by growth are TD as always. A ViT (global attention) or the MLP (fixed band
    positions) solve the task at any depth. Inputs ``x [N, 1, size, size]`` float32 (standardised
    by one scalar), ``y [N]`` int64; cross-entropy; test metric: accuracy.

    Args:
        seed: data seed. n_train, n_val, n_test: split sizes. size: image side.
        gap: background columns between the bands (``size - gap >= 4``).
        noise: noise level. config: network/budget override.
    """
    fn = "textures_task"
    _check_sizes(fn, noise, n_train=n_train, n_val=n_val, n_test=n_test)
    if isinstance(size, bool) or not isinstance(size, int) or size < 6:
        raise ValueError(f"{fn}: size must be an int >= 6, got {size!r}")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0 or size - gap < 4:
        raise ValueError(f"{fn}: gap must be an int in [0, size - 4] = [0, {size - 4}], got {gap!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n = n_train + n_val + n_test
    band = (size - gap) // 2
    orient = torch.randint(0, 2, (n, 2), generator=gen)  # 0 horizontal, 1 vertical; left, right
    contrast = 0.75 + 0.5 * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    r = torch.arange(size)[:, None].expand(size, size)
    c = torch.arange(size)[None, :].expand(size, size)
    img = noise * torch.randn(n, size, size, generator=gen, dtype=torch.float64)
    for k, cols in enumerate((c < band, c >= size - band)):
        coord = torch.where(orient[:, k, None, None] == 0, r, c)  # horizontal stripes vary along rows
        stripes = ((coord % 2) * 2 - 1).double()
        img = img + stripes * contrast[:, k, None, None] * cols
    labels = (orient[:, 0] == orient[:, 1]).long()
    mean, std = img[:n_train].mean(), img[:n_train].std()
    x = ((img - mean) / std).float()[:, None]
    cfg = config or ModelConfig(width=64, depth=2, lr=2e-3, batch_size=64, epochs_per_round=5, rounds=4, max_depth=10,
                                model="cnn", channels=(16,), embed_dim=32, patch_size=4, num_heads=2, mlp_ratio=2.0,
                                block_activation="relu")
    info = {
        "bands": "left and right, horizontal or vertical stripes (period 2), random phase and contrast [0.5, 1.5]",
        "label": "1 if both bands have the same orientation",
        "size": size,
        "band_columns": band,
        "gap": gap,
        "noise": noise,
        "samples": {"train": n_train, "val": n_val, "test": n_test},
    }
    return _make_task("textures", x, labels, n_train, n_val, metric="accuracy", classes=2, config=cfg, seed=seed,
                      info=info)


def _regression_fn(x: Tensor) -> Tensor:
    x1, x2 = x[:, 0], x[:, 1]
    return (torch.sin(math.pi * x1) * torch.cos(math.pi * x2) + 0.5 * torch.sin(2 * math.pi * x1 * x2))[:, None]


def regression_task(
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 300,
    n_test: int = 1000,
    noise: float = 0.01,
    config: Optional[ModelConfig] = None,
) -> Task:
    """Smooth regression ``y = sin(pi x1) cos(pi x2) + 0.5 sin(2 pi x1 x2) + noise`` on
    ``[-1, 1]^2`` (noise on the training and validation targets only). MSE; metric: test MSE."""
    gen = torch.Generator().manual_seed(int(seed))
    n_all = n_train + n_val + n_test
    x = torch.rand(n_all, 2, generator=gen, dtype=torch.float64) * 2 - 1
    y = _regression_fn(x)
    eps = noise * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    eps[n_train + n_val :] = 0
    cfg = config or ModelConfig(width=32, depth=2, lr=2e-3, batch_size=64, epochs_per_round=30, rounds=4, max_depth=8)
    return _make_task("regression", x.float(), (y + eps).float(), n_train, n_val, metric="mse", config=cfg, seed=seed,
                      info={"function": "sin(pi x1) cos(pi x2) + 0.5 sin(2 pi x1 x2)", "noise": noise})


_TASKS: Dict[str, Callable[..., Task]] = {
    "heat": heat_task,
    "digits": digits_task,
    "regression": regression_task,
    "digits-images": digits_images_task,
    "navier-stokes": navier_stokes_task,
    "textures": textures_task,
}


def available_tasks() -> List[str]:
    """Names accepted by :func:`get_task`."""
    return sorted(_TASKS)


def get_task(name: str, *, seed: int = 0, **kwargs) -> Task:
    """Builds a built-in task, deterministic per ``seed``.

    Args:
        name: ``"heat"`` (default task of the CLI), ``"digits"``, ``"regression"``,
            ``"digits-images"``, ``"navier-stokes"`` or ``"textures"`` (:func:`available_tasks`).
        seed: data seed.
        **kwargs: task options (split sizes, ``config=ModelConfig(...)``, ...): see
            :func:`heat_task`, :func:`digits_task`, :func:`regression_task`,
            :func:`digits_images_task`, :func:`navier_stokes_task`, :func:`textures_task`.
    """
    if name not in _TASKS:
        raise ValueError(f"get_task: unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name](seed=seed, **kwargs)
