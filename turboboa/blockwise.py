"""The block pipeline: one transformer block at a time, statistics from hooks, solve, feed the next block.

For block i (reference notes, section 4):

1. keep the block's input for every calibration sequence: the quantized stream ``X`` and, for TurboBoA's F2,
   the full-precision stream ``X_fp``;
2. run the full-precision block on both streams, accumulating every linear layer's input Hessian
   ``H = 2 X X^T / n`` (forward hooks), the F2 cross terms ``C = 2 (X_fp - X) X^T / n`` and, for BoA/TurboBoA,
   the attention statistics (post-RoPE query/key covariances, attention-weighted value inputs);
3. quantize the block's layers;
4. push ``X`` through the quantized block (``X_fp`` already went through the full-precision block in step 2).

Only one block is on the device at a time. The streams are kept in ``--calib-dtype`` between blocks (float32,
or bfloat16/float16 for half their memory); each shard is cast to float32 for the block's computation.

Statistics are ordered sums over canonical shards of the calibration set (chunks of ``chunk_size`` sequences):
each shard's sums are computed on their own and folded in shard order. Under ``torchrun`` each rank runs its
contiguous share of the shards (both streams), the shard sums are all-gathered and folded in the same order
on every rank, the layers of a stage are solved spread over the ranks and gathered, so every rank holds the
same block, byte for byte as one process would (:mod:`turboboa.distributed`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import get_adapter
from .arch.base import ArchAdapter
from .config import QuantConfig
from .distributed import World, to_device
from .errors import UserError
from .formats.presets import ModelShape
from .formats.registry import get_format
from .hessians import CovarianceAccumulator
from .hessians.attention import AttentionStatistics
from .models.chunks import chunk_size, module_name
from .models.stream import StreamedModel, trim_heap
from .numerics import check_finite, check_quantized_finite
from .output_files import kill_point
from .quantized import QuantizedLinear, empty_rows, set_rows
from .solvers import HessianError, LayerProblem, solve_layer

# rows of an embedding table or output head rounded at a time (quantize_embedding, quantize_head)
TABLE_ROWS = 4096


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; TF32 is turned off so float32 stays float32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif name != "cpu":
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class PipelineResult:
    layers: dict[str, QuantizedLinear]
    seconds: float
    peak_memory: int
    block_seconds: list[float] = field(default_factory=list)
    # wall seconds of this run's blocks by phase: "statistics" (calibration passes collecting Hessians and
    # attention statistics), "solve" (the solver), "propagate" (the quantized blocks' outputs)
    phase_seconds: dict[str, float] = field(default_factory=dict)


def model_shape(model: nn.Module, adapter: ArchAdapter | None = None) -> ModelShape:
    """Layers, query heads per KV head and tied embeddings of a transformers causal LM (for presets)."""
    adapter = adapter or get_adapter(model)
    return ModelShape(n_layers=len(adapter.blocks(model)), n_gqa=adapter.attention_shape(model).group_size,
                      tied=bool(getattr(model.config, "tie_word_embeddings", False)))


def check_group_size(model: nn.Module, adapter: ArchAdapter, cfg: QuantConfig) -> dict[str, str]:
    """Every layer's grid, checked before any work: returns the format of each layer by full name.

    Each layer's format checks its width (:meth:`~turboboa.formats.registry.Format.check_columns`): a uniform
    grid must hold at least one whole group (a width that is not a multiple of the group size ends in a
    narrower last group, 576 = 4 x 128 + 64 for SmolLM2's hidden size, as GPTQ does; a group wider than a
    layer is an error); a block format must fit the width (after the documented fallbacks).
    """
    group_size = cfg.group_size
    formats = {}
    shape = model_shape(model, adapter)
    for i, block in enumerate(adapter.blocks(model)):
        prefix = module_name(model, block) + "."
        for name in adapter.linear_names():
            width = block.get_submodule(name).in_features
            fmt = formats[prefix + name] = cfg.layer_format(prefix + name, width, shape, adapter.role_of(name))
            get_format(fmt).check_columns(width, group_size, f"layer {i}.{name}")
    return formats


@dataclass
class BlockStatistics:
    """The statistics of one stage of a block: each input group's covariance (by the group's first layer) and,
    for BoA/TurboBoA, the attention statistics; one shard's, or the ordered fold of several (``merge``)."""

    covs: dict[str, CovarianceAccumulator]
    attn: AttentionStatistics | None = None
    normed: dict[str, CovarianceAccumulator] = field(default_factory=dict)
    weights: dict[str, tuple[int, float]] = field(default_factory=dict)

    @classmethod
    def empty(cls, names: list[str], attention: bool,
              weights: dict[str, tuple[int, float]] | None = None) -> BlockStatistics:
        """Empty statistics of the groups led by ``names``; ``weights``: the layers whose output an RMSNorm
        reads, with the norm's group size (head size, or 0 for the whole output) and eps, which get their own
        norm-weighted covariance (:class:`_NormWeights`)."""
        weights = dict(weights or {})
        return cls({g: CovarianceAccumulator() for g in names}, AttentionStatistics() if attention else None,
                   {name: CovarianceAccumulator() for name in weights}, weights)

    def merge(self, other: BlockStatistics) -> None:
        """Fold in ``other``'s sums after this one's."""
        for name, acc in self.covs.items():
            acc.merge(other.covs[name])
        for name, acc in self.normed.items():
            acc.merge(other.normed[name])
        if self.attn is not None and other.attn is not None:
            self.attn.merge(other.attn)


class _InputCapture:
    """Forward pre-hooks that keep the input of the first layer of each group of layers sharing one input."""

    def __init__(self, block: nn.Module, names: list[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [
            block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names
        ]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[name] = args[0].detach()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _NormWeights:
    """Forward hooks that turn the output ``z`` of each layer an RMSNorm reads into per-token weights
    ``w_t = mean_g 1 / (mean_c z_{t,g,c}^2 + eps)``: the norm's ``1 / rho_t^2``, averaged over the heads ``g``
    of a per-head norm (groups of ``size`` channels; ``size`` 0: one group, the whole output)."""

    def __init__(self, block: nn.Module, weights: dict[str, tuple[int, float]]):
        self.weights: dict[str, torch.Tensor] = {}
        self.handles = [block.get_submodule(n).register_forward_hook(self._hook(n, *spec))
                        for n, spec in weights.items()]

    def _hook(self, name: str, size: int, eps: float) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            z = out.detach().float().reshape(-1, out.shape[-1])
            z = z.reshape(z.shape[0], -1, size) if size else z[:, None, :]
            self.weights[name] = (1.0 / (z.pow(2).mean(-1) + eps)).mean(-1)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def norm_weighted_layers(adapter: ArchAdapter, block: nn.Module, names: list[str],
                         head_dim: int) -> dict[str, tuple[int, float]]:
    """The layers among ``names`` whose output an RMSNorm reads first (:meth:`Layout.normed_outputs`), with
    the norm's group size (``head_dim`` for a per-head norm, 0 for the whole output) and its eps."""
    normed = adapter.LAYOUT.normed_outputs()
    out = {}
    for name in names:
        role = adapter.role_of(name)
        if role in normed:
            norm_role, per_head = normed[role]
            norm = block.get_submodule(adapter.LAYOUT.block_module(norm_role))
            out[name] = (head_dim if per_head else 0, adapter.norm_eps(norm))
    return out


def quantize_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    cfg: QuantConfig,
    device: torch.device,
    progress: bool = True,
    start_block: int = 0,
    state: dict | None = None,
    on_block_done: Callable[[int, dict[str, QuantizedLinear], dict], None] | None = None,
    world: World | None = None,
    streamed: StreamedModel | None = None,
) -> PipelineResult:
    """Quantize every block's linear layers of ``model`` (modified in place into its fake-quant form).

    ``calib_ids``: ``(n, L)`` token ids. ``start_block``/``state`` resume a run whose streams were saved by
    ``on_block_done(i, layers_of_block, state)`` (state holds the streams ``X`` and ``X_fp``, the next block's
    inputs, and the block's ``seconds``; :mod:`turboboa.resume`). The blocks before ``start_block`` must
    already hold their fake-quant weights. NaN/Inf in a block's output, a Hessian or a solved grid is a
    one-line :class:`~turboboa.numerics.NonFiniteError` naming the block or layer.

    ``world``: the ranks of a ``torchrun`` run (:mod:`turboboa.distributed`); this rank keeps the streams of
    its shards only, and ``on_block_done`` is called on every rank with the all-gathered streams.

    ``streamed``: ``model`` is a streamed skeleton (:mod:`turboboa.models.stream`): each block is read from the
    source when its turn comes and its linear weights are given back when it is done; the embedding is given
    back once the calibration tokens are embedded, and read again with the head before they are rounded; the
    blocks' quantized layers are then not kept in the result (the caller has them from ``on_block_done``),
    only the tables'.
    """
    world = world or World()
    t0 = time.time()
    adapter = get_adapter(model)
    formats = check_group_size(model, adapter, cfg)
    blocks = adapter.blocks(model)
    shape = adapter.attention_shape(model)
    n, L = calib_ids.shape
    use_dx = cfg.uses_dx
    step = chunk_size(n, L, shape.n_heads)  # the canonical shards: of the whole set, whatever the ranks
    mine = world.sequence_span(n, step)  # this rank's sequences
    if world.size > -(-n // step):
        raise UserError(f"{world.size} ranks but the {n} calibration sequences make {-(-n // step)} shards of {step}; "
                        f"use at most {-(-n // step)} ranks or more --nsamples")
    with torch.no_grad():
        cos, sin = adapter.rotary_cos_sin(model, L, device)
        if state is None:
            ids = calib_ids[mine]
            X = torch.cat([adapter.embed(model, ids[i : i + 8]).float() for i in range(0, ids.shape[0], 8)])
            X = X.to(device=device, dtype=cfg.stream_dtype)  # kept in --calib-dtype; blocks compute in float32
            world.together(lambda: check_finite(X, "the embedding of the calibration tokens",
                                                "check the model's embedding weights"))
            X_fp = X.clone() if use_dx else None
        else:
            X = state["X"][mine].to(device)
            X_fp = None if state.get("X_fp") is None else state["X_fp"][mine].to(device)
        if streamed is not None:
            streamed.release_embedding()  # read again for the tables, after the blocks
        layers: dict[str, QuantizedLinear] = {}
        block_seconds: list[float] = []
        phases = {"statistics": 0.0, "solve": 0.0, "propagate": 0.0}
        bar = tqdm(range(start_block, len(blocks)), desc=f"{cfg.method} w{cfg.bits}", unit="block",
                   disable=not progress, initial=start_block, total=len(blocks))
        prefix = module_name(model, blocks) + "."
        need_stats = cfg.method != "rtn" or cfg.grid_spec().search
        # true-sequential: each group of layers sees the inputs produced by the already-quantized groups before it
        stages = [[g] for g in adapter.LINEAR_GROUPS] if cfg.true_sequential else [adapter.LINEAR_GROUPS]
        for i in bar:
            tb = time.time()
            block = blocks[i] if streamed is None else streamed.load_block(i)
            block.to(device=device, dtype=torch.float32)
            # the fp stream needs the block's original weights: a copy when groups are quantized between passes
            fp_block = (copy.deepcopy(block) if cfg.true_sequential else block) if use_dx else None
            block_layers: dict[str, QuantizedLinear] = {}
            for si, stage in enumerate(stages):
                weighted = norm_weighted_layers(adapter, block, [n for g in stage for n in g],
                                                shape.head_dim) if cfg.is_row_method else {}
                stats = BlockStatistics.empty([g[0] for g in stage], cfg.is_row_method and si == 0, weighted)
                tp = time.perf_counter()
                if need_stats:
                    # the last pass also advances the fp stream to the next block's input
                    _collect(adapter, block, fp_block, X, X_fp, cos, sin, step, stats, world, device,
                             advance_fp=si == len(stages) - 1)
                    trim_heap()  # the activations' memory back to the system before the solves
                phases["statistics"] += time.perf_counter() - tp
                tp = time.perf_counter()
                block_layers.update(_solve_groups(block, adapter, stage, cfg, stats, cos, sin,
                                                  use_dx, f"{prefix}{i}.", formats, world))
                phases["solve"] += time.perf_counter() - tp
            kill_point(f"solve:{i}")
            if streamed is None:
                layers.update(block_layers)
            tp = time.perf_counter()
            for c0 in range(0, n, step):
                sl = slice(c0, c0 + step)
                X[sl] = adapter.block_forward(block, X[sl].float(), cos, sin)
            phases["propagate"] += time.perf_counter() - tp
            world.together(functools.partial(_check_outputs, X, X_fp, f"block {prefix}{i}"))
            block.to("cpu")
            del fp_block
            if streamed is not None:
                streamed.release_block(i)
            block_seconds.append(time.time() - tb)
            if on_block_done is not None:
                on_block_done(i, block_layers, {"X": _all_sequences(world, X), "X_fp": _all_sequences(world, X_fp),
                                                "seconds": block_seconds[-1]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        layout = adapter.LAYOUT
        embedding, head = (quantize_embedding(model, cfg), quantize_head(model, cfg)) if streamed is None else \
            quantize_streamed_tables(model, cfg, streamed)
        for name, table in ((layout.embedding, embedding), (layout.head, head)):
            if table is not None:
                layers[name] = table
    return PipelineResult(layers, time.time() - t0, peak_memory_bytes(device), block_seconds, phases)


def _check_outputs(X: torch.Tensor, X_fp: torch.Tensor | None, where: str) -> None:
    """NaN/Inf in a block's outputs (this rank's sequences) is a one-line error naming ``where``."""
    hint = "try more bits, a larger --damp, or check the model's weights"
    check_finite(X, f"{where}: the quantized stream's output", hint)
    check_finite(X_fp, f"{where}: the full-precision stream's output", hint)


def _all_sequences(world: World, stream: torch.Tensor | None) -> torch.Tensor | None:
    """The stream of every calibration sequence: the ranks' shares concatenated in rank (= sequence) order."""
    if stream is None or not world.distributed:
        return stream
    return torch.cat(world.all_gather([stream]))


def quantize_layer(problem: LayerProblem, cfg: QuantConfig) -> QuantizedLinear:
    """Solve ``problem`` as the block loop does: with ``cfg``'s method's own configuration
    (:meth:`QuantConfig.solver_config`), onto the grid of the layer's format (``problem.fmt``, else ``cfg``'s
    ``format``; :meth:`QuantConfig.solver_grid`)."""
    grid, group_size = cfg.solver_grid(problem.fmt or cfg.format)
    return solve_layer(problem, cfg.solver_config(), grid, group_size)


def quantize_embedding(model: nn.Module, cfg: QuantConfig) -> QuantizedLinear | None:
    """The token embedding rounded (RTN, range search) onto ``cfg``'s embedding format, or None to keep it
    in float. It is a lookup table (and the head when tied), so no layer Hessian applies; the fake-quant
    model then uses the quantized table (and head) exactly as llama.cpp does."""
    adapter = get_adapter(model)
    name, emb = adapter.LAYOUT.embedding, model.get_input_embeddings()
    fmt = cfg.embedding_format(emb.weight.shape[1], model_shape(model, adapter), name, "embedding")
    return _round_table(name, emb, fmt, cfg)


def quantize_head(model: nn.Module, cfg: QuantConfig) -> QuantizedLinear | None:
    """An untied output head (a rotation with a non-unit final norm unties it) rounded like the embedding
    (RTN, range search) onto the head's format (``--embed-format``, else the preset's output type, e.g. q6_k),
    or None when the head is tied or kept in float. llama-quantize treats ``output.weight`` the same way."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        return None
    adapter = get_adapter(model)
    name = adapter.LAYOUT.head
    fmt = cfg.embedding_format(head.weight.shape[1], model_shape(model, adapter), name, "head")
    return _round_table(name, head, fmt, cfg)


def quantize_streamed_tables(model: nn.Module, cfg: QuantConfig,
                             streamed: StreamedModel) -> tuple[QuantizedLinear | None, QuantizedLinear | None]:
    """:func:`quantize_embedding` and :func:`quantize_head` of a streamed model with one table in memory at a
    time: the embedding is read, rounded and given back (the quantized layer holds it) before an untied head is
    read, rounded and given back. A table kept in float stays for the QDIR's float tensors."""
    streamed.load_embedding()
    embedding = quantize_embedding(model, cfg)
    if embedding is not None:
        streamed.release_embedding()
    head = None
    if not streamed.head_is_tied():
        streamed.load_head()
        head = quantize_head(model, cfg)
        if head is not None:
            streamed.release_table(model.get_output_embeddings())
            trim_heap()
    return embedding, head


def _round_table(name: str, module: nn.Module, fmt: str, cfg: QuantConfig) -> QuantizedLinear | None:
    """``module.weight`` rounded (RTN with range search) onto ``fmt`` and loaded back in place; None for "".

    Every row is rounded on its own grids, so the table is solved :data:`TABLE_ROWS` rows at a time (the range
    search's temporaries are several times the rows it sees; a 150k-token vocabulary at once needs GBs)."""
    if not fmt:
        return None
    rtn = dataclasses.replace(cfg, method="rtn", grid="search")
    weight = module.weight
    eye = torch.eye(weight.shape[1])
    table: QuantizedLinear | None = None
    for r0 in range(0, weight.shape[0], TABLE_ROWS):
        rows = slice(r0, r0 + TABLE_ROWS)
        part = quantize_layer(LayerProblem(name, weight[rows].detach().float(), eye, fmt=fmt), rtn)
        check_quantized_finite(name, {"codes": part.codes, "scales": part.scale, "zero points": part.zero,
                                      **({} if part.grid is None else vars(part.grid))})
        with torch.no_grad():
            weight[rows].copy_(part.dequantize().to(weight.dtype))
        if table is None:
            table = empty_rows(part, weight.shape[0])
        set_rows(table, r0, part)
    return table


def _collect(
    adapter: ArchAdapter,
    block: nn.Module,
    fp_block: nn.Module | None,
    X: torch.Tensor,
    X_fp: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    step: int,
    stats: BlockStatistics,
    world: World,
    device: torch.device,
    advance_fp: bool = False,
) -> None:
    """One pass over this rank's calibration shards: the block on ``X`` (and the full-precision block on
    ``X_fp``), ``step`` sequences (one shard) at a time.

    With ``advance_fp`` the full-precision block's outputs replace ``X_fp`` (the next block's fp input).

    Accumulates, per shard, the sums of ``H = 2 X X^T / n`` of each layer named in ``stats.covs`` (inputs caught
    by forward pre-hooks), the F2 cross terms ``C = 2 (X_fp - X) X^T / n`` when ``fp_block`` is given, the same
    with each token weighted by its norm's ``1 / rho_t^2`` for the layers of ``stats.normed`` (weights from the
    quantized stream's outputs, :class:`_NormWeights`), and the attention statistics; the shards' sums are folded into ``stats`` in shard order (one process: each shard as
    it is done; several ranks: all-gathered after the pass, :meth:`World.fold_shards`).
    """
    names = list(stats.covs)
    inputs = names + [n for n in stats.normed if n not in names]
    capture = _InputCapture(block, inputs)
    norm_weights = _NormWeights(block, stats.weights)  # after the fp pass: the quantized stream's weights
    # the fp block may be the block itself (one-pass mode): then one set of hooks serves both streams
    capture_fp = None if fp_block is None else capture if fp_block is block else _InputCapture(fp_block, inputs)
    pending: list[BlockStatistics] = []  # this rank's shards, when the fold must wait for the other ranks'
    try:
        for c0 in range(0, X.shape[0], step):
            sl = slice(c0, c0 + step)
            shard = BlockStatistics.empty(names, stats.attn is not None, stats.weights)
            rec_fp: dict[str, torch.Tensor] | None = None
            inputs_fp: dict[str, torch.Tensor] = {}
            if capture_fp is not None:
                rec_fp = {}
                out_fp = adapter.block_forward(fp_block, X_fp[sl].float(), cos, sin,
                                               rec_fp.__setitem__ if shard.attn is not None else None)
                inputs_fp = dict(capture_fp.inputs)  # snapshot before the quantized stream overwrites it
            rec: dict[str, torch.Tensor] = {}
            adapter.block_forward(block, X[sl].float(), cos, sin, rec.__setitem__ if shard.attn is not None else None)
            # one process: the covariances take this shard's sums as they are made (the very updates a merge
            # would replay, in the same order), so no shard's d_in x d_in sums wait beside the running ones
            covs = shard if world.distributed else stats
            for name in names:
                x = capture.inputs[name]
                covs.covs[name].add(x)
                if inputs_fp:
                    covs.covs[name].add_cross(inputs_fp[name], x)
            for name, acc in covs.normed.items():
                x, w = capture.inputs[name], norm_weights.weights[name]
                acc.add(x, w)
                if inputs_fp:
                    acc.add_cross(inputs_fp[name], x, w)
            if shard.attn is not None:
                shard.attn.add(rec, rec_fp)
            if capture_fp is not None and advance_fp:
                X_fp[sl] = out_fp
            if world.distributed:  # held in CPU memory until every rank has its shards (exact copies)
                pending.append(to_device(shard, torch.device("cpu")))
            else:
                stats.merge(shard)
    finally:
        capture.remove()
        norm_weights.remove()
        if capture_fp is not None and capture_fp is not capture:
            capture_fp.remove()
    if world.distributed:
        world.fold_shards(pending, stats, device)


_HESSIAN_HINT = "the layer inputs overflowed; check the model's weights and the calibration data"


def _solve_groups(
    block: nn.Module,
    adapter: ArchAdapter,
    groups: list[list[str]],
    cfg: QuantConfig,
    stats: BlockStatistics,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    use_dx: bool,
    prefix: str,
    formats: dict[str, str],
    world: World | None = None,
) -> dict[str, QuantizedLinear]:
    """Build each layer's problem from the statistics, solve it, and load the fake-quant weight into ``block``.

    The layers of ``groups`` are independent (their statistics are collected before any is solved): under
    ``torchrun`` each rank solves a contiguous share of them (:meth:`World.shard_span`) and every rank loads
    every layer's result, gathered in the stages' order.

    ``cos``/``sin``: the RoPE tables of the calibration length (None without RoPE). By role, the query and key
    projections take the attention row Hessians, the value projection its attention-weighted column Hessian;
    a layer whose output an RMSNorm reads takes its norm-weighted covariance (``stats.normed``).
    """
    world = world or World()
    out = {}
    covs, attn = stats.covs, stats.attn
    row_q = row_k = col_v = cross_v = None
    if attn is not None:
        row_q, row_k = attn.row_hessian_q(cos, sin), attn.row_hessian_k(cos, sin)
        col_v, cross_v = attn.col_hessian_v(), attn.cross_v() if use_dx else None
        for what, t in (("query row Hessian", row_q), ("key row Hessian", row_k), ("value Hessian", col_v),
                        ("value F2 cross term", cross_v)):
            check_finite(t, f"block {prefix.rstrip('.')}: the attention {what}", _HESSIAN_HINT)
    attention = (row_q, row_k, col_v, cross_v)
    jobs = [(group, name) for group in groups for name in group]
    mine = world.shard_span(len(jobs))  # this rank's layers: a contiguous share, in the stage's order

    accs = {name: stats.normed.get(name, covs[group[0]]) for group, name in jobs}
    readers = collections.Counter(id(acc) for acc in accs.values())

    def solve_mine() -> list[tuple[str, QuantizedLinear]]:
        done = []
        for _, name in jobs[mine.start : mine.stop]:
            done.append((prefix + name, _solve_layer(block, adapter, name, cfg, accs[name],
                                                     readers[id(accs[name])] == 1, use_dx, prefix, formats, attention)))
            trim_heap()  # a solve's temporaries back to the system before the next one's
        return done

    solved = world.together(solve_mine)
    weights = block.get_submodule(jobs[0][1]).weight if jobs else None
    for full, q in world.all_gather(solved):
        if world.distributed and weights is not None:
            q = to_device(q, weights.device)
        module = block.get_submodule(full[len(prefix):])
        module.weight.data.copy_(q.dequantize().to(module.weight.device, module.weight.dtype))
        out[full] = q
    return out


def _solve_layer(block: nn.Module, adapter: ArchAdapter, name: str, cfg: QuantConfig, acc: CovarianceAccumulator,
                 sole_reader: bool, use_dx: bool, prefix: str, formats: dict[str, str],
                 attention: tuple[torch.Tensor | None, ...]) -> QuantizedLinear:
    """Layer ``name`` solved on its statistics: its input covariance ``acc`` (its group's, or its own
    norm-weighted one; ``sole_reader``: no other layer reads it, so its memory becomes the problem's) and, by
    role, the attention Hessians ``attention = (row_q, row_k, col_v, cross_v)`` (None without them)."""
    row_q, row_k, col_v, cross_v = attention
    W = block.get_submodule(name).weight.detach().float()
    if acc.n == 0:  # RTN with min-max grids needs no statistics
        problem = LayerProblem(prefix + name, W, torch.eye(W.shape[1], device=W.device))
    else:
        H, C = acc.take() if sole_reader else (acc.H, acc.C)
        C = C if use_dx else None
        check_finite(H, f"layer {prefix}{name}: the input Hessian", _HESSIAN_HINT)
        check_finite(C, f"layer {prefix}{name}: the F2 cross term", _HESSIAN_HINT)
        problem = LayerProblem(prefix + name, W, H, cross=C, owned=True)  # taken, or computed for this layer
        del H, C
    problem.fmt = formats[prefix + name]
    role = adapter.role_of(name)
    if row_q is not None:
        if role == "q":
            problem.H_row, problem.heads = row_q, row_q.shape[0]
        elif role == "k":
            problem.H_row, problem.heads = row_k, row_k.shape[0]
        elif role == "v":  # the attention statistics, which the caller keeps
            problem.H, problem.heads, problem.cross, problem.owned = col_v, col_v.shape[0], cross_v, False
    try:
        q = quantize_layer(problem, cfg)
    except HessianError as e:
        raise UserError(f"cannot quantize {e}") from None
    check_quantized_finite(prefix + name, {"codes": q.codes, "scales": q.scale, "zero points": q.zero,
                                           **({} if q.grid is None else vars(q.grid))})
    return q
