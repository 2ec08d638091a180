"""Public entry points: ``mhc_compile``, the ``hyper_connected`` decorator, the
``MHC_DISABLE`` off switch and ``inspect``.

Data flows one way: capture (export, for analysis) -> find residuals and owners ->
sample forward (block call arguments, chain links) -> trace + rewrite each block ->
install the rewritten forwards. Every check runs before the model is touched, so a
failed conversion leaves the user's model as it was.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import nn

from . import blocks, initialization, runtime, saved_options, verify
from .blocks import BlockAnalysis
from .capture import export_model, record_calls, resolve_example_inputs
from .trace import CustomFunctionError
from .config import MHCConfig
from .errors import CaptureError, ConversionError, MHCConfigError, MHCError
from .heuristics import hyper_connection_modules, is_mhc_parameter_name
from .passes.find_residuals import find_residual_adds, inside, owner_module, reaches_output, topmost

logger = logging.getLogger("mhc_compile")

DISABLE_ENV = "MHC_DISABLE"
T = TypeVar("T")


FilterFn = Callable[[nn.Module, str], bool]


class NoResidualError(ConversionError, MHCError):
    """The model has no residual add ``x + F(x)`` to rewrite."""


@dataclass
class ModelAnalysis:
    """Result of analysing a model: its blocks, connections, chains and cut adds."""

    config: MHCConfig
    blocks: list[BlockAnalysis]
    cuts: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One row per connection: index, block path, branch, hidden size, chain, links."""
        out = []
        for b in self.blocks:
            for c in b.connections:
                out.append(
                    {
                        "index": len(out),
                        "block": b.path or "(root)",
                        "branch": c.branch,
                        "hidden_size": c.hidden_size,
                        "layout": "[..., n, C]" if b.channel_dim == -1 else "[B, n, C, *S]",
                        "chain": b.chain,
                    }
                )
        return out


def disabled() -> bool:
    """True when the ``MHC_DISABLE`` environment variable switches conversions off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_converted(model: nn.Module) -> bool:
    """True for a model returned by :func:`mhc_compile` (or containing converted blocks).

    ``mode="residual"`` (analysis only) does not count: such a model can still be converted.
    """
    return getattr(model, "_mhc_analysis", None) is not None or any(
        runtime.is_converted_block(m) for m in model.modules()
    )


def mhc_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters that conversion added (``phi``, ``bias``, ``alpha`` of each connection)."""
    for name, p in model.named_parameters():
        if is_mhc_parameter_name(name):
            yield p


def analyse(
    model: nn.Module, config: MHCConfig, example_inputs: Any = None, filter_fn: Optional[FilterFn] = None
) -> ModelAnalysis:
    """Find the model's residual chains without changing it.

    ``filter_fn(module, fqn) -> bool`` chooses which of the candidate blocks (the topmost
    modules owning residual adds; ``fqn`` is ``""`` for the model itself) are converted;
    the adds of a rejected block stay plain residual adds and cut the chain there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc_compile expects an nn.Module, got {type(model).__name__}")
    args, kwargs = resolve_example_inputs(model, example_inputs)
    exported = export_model(model, args, kwargs)
    residuals, cuts = find_residual_adds(exported.graph, exported.is_param)
    live = reaches_output(exported.graph)
    every_add = [(r, r.add in live) for r in residuals]  # graph order; unused: left plain
    residuals = [r for r in residuals if r.add in live]
    if not residuals:
        raise NoResidualError(
            f"found no residual add (x + F(x), both of the same shape, F with trained "
            f"parameters) in {type(model).__name__}; mhc_compile rewrites residual "
            "connections, so this model has nothing to convert" + _near_misses(exported, cuts, every_add)
        )
    modules = dict(model.named_modules())
    residuals, long_skips = _split_long_skips(residuals, exported.module_path, modules)
    if not residuals:
        raise NoResidualError(
            f"the only residual adds found in {type(model).__name__} span several layers of a "
            f"stack, which mhc_compile leaves alone: {'; '.join(long_skips)}"
        )
    owners = [_called_owner(owner_module(r, exported.module_path), modules) for r in residuals]
    candidates = topmost(owners)
    block_paths = _filter_blocks(candidates, modules, filter_fn)
    rejected = [p for p in candidates if p not in block_paths]
    records = record_calls(model, block_paths, args, kwargs)
    for path, rec in records.items():
        if rec.calls == 0:
            raise ConversionError(
                f"module {path or '(root)'!r} ({type(modules[path]).__name__}) owns residual adds "
                "but was not called in the sample forward; pass example_inputs= that run it"
            )
    ordered = sorted(block_paths, key=lambda p: records[p].order)

    def unused_in(path: str) -> tuple[tuple[int, ...], int]:
        """Positions of ``path``'s adds whose result reaches no output, and its add count."""
        if records[path].calls != 1:
            return (), -1
        mine = [used for r, used in every_add if _within(_owner(r), path)]
        return tuple(i for i, used in enumerate(mine) if not used), len(mine)

    def _owner(r: Any) -> str:
        return _called_owner(owner_module(r, exported.module_path), modules)

    analyses, fallback_notes = [], []
    for p in ordered:
        try:
            analyses.append(_analyse_block(p, modules[p], records[p], config, unused_in(p)))
        except CaptureError as err:
            inner = topmost([o for o in owners if inside(o, p)])
            if not inner or _runs_custom_function(err):
                # the blocks inside a custom autograd.Function (Reformer's reversible layers)
                # run under its hand-written backward: they cannot be rewritten either
                raise
            # the blocks inside a block that cannot be traced (an encoder with LayerDrop
            # that owns a positional-convolution add) are converted on their own
            fallback_notes.append(
                f"{p or '(root)'}: its own residual adds are not rewritten ({err}); "
                f"the {len(inner)} blocks inside it are converted instead"
            )
            records.update(record_calls(model, inner, args, kwargs))
            analyses += [_analyse_block(q, modules[q], records[q], config, unused_in(q)) for q in inner]
    if fallback_notes:  # one sample forward again, for every block's call order
        records = record_calls(model, [a.path for a in analyses], args, kwargs)
        analyses.sort(key=lambda a: records[a.path].order)
    dropped = []
    for a in analyses:
        a.calls = records[a.path].calls
        found = sum(1 for o in owners if _within(o, a.path))
        expected = found // a.calls  # a weight-shared block's adds appear once per call
        if len(a.connections) > expected:
            raise ConversionError(
                f"block {a.path or '(root)'!r}: the whole-model capture found {expected} "
                f"residual adds in it but tracing the block found {len(a.connections)}; "
                "the block's forward may branch on its inputs in a way tracing cannot follow"
            )
        if len(a.connections) < expected:  # adds inside children that do not trace
            a.cuts.append(
                f"{a.path or '(root)'}: {expected - len(a.connections)} of its {expected} residual adds "
                "are not rewritten: they lie in children whose code torch.fx cannot trace, kept as "
                f"single calls: {', '.join(a.opaque) or '(none recorded)'}"
            )
        if not a.connections:
            dropped.append(a)
    analyses = [a for a in analyses if a.connections]
    if not analyses:
        raise ConversionError(
            f"{type(model).__name__} has residual adds, but none lies in code torch.fx can trace: "
            + "; ".join(n for a in dropped for n in a.cuts)
        )
    chain_notes = _link_chains(analyses, records)
    # adds inside a block are reported by the block's own trace
    cut_paths = [exported.module_path(c.add) for c in cuts]
    cut_notes = [
        f"{path or '(root)'}: {c.reason}"
        for c, path in zip(cuts, cut_paths)
        if not any(path == b or inside(path, b) for b in block_paths)
    ]
    cut_notes += [f"{p or '(root)'}: not converted (filter_fn)" for p in rejected] + long_skips
    block_notes = [n for a in dropped + analyses for n in a.cuts]
    return ModelAnalysis(config, analyses, cut_notes + fallback_notes + chain_notes + block_notes)


def _runs_custom_function(err: BaseException) -> bool:
    """``err`` (or a cause of it) is the trace's refusal of a custom ``autograd.Function``."""
    while err is not None:
        if isinstance(err, CustomFunctionError):
            return True
        err = err.__cause__
    return False


def _near_misses(exported: Any, cuts: list, every_add: list) -> str:
    """What came closest to a residual connection, for a model that has none."""
    parts = []
    if cuts:
        where = sorted({exported.module_path(c.add) or "(root)" for c in cuts})
        parts.append(
            f"{len(cuts)} adds sum two trained branches of one input, none of them the input "
            f"itself (multi-branch blocks such as RepVGG's conv + batch-norm branches), in "
            f"{', '.join(repr(w) for w in where[:3])}{' and more' if len(where) > 3 else ''}"
        )
    if every_add:
        parts.append(f"{len(every_add)} residual adds whose result reaches no output of the model")
    return f" (not residual connections: {'; '.join(parts)})" if parts else ""


def _within(owner: str, path: str) -> bool:
    """True when an add owned by ``owner`` lies in block ``path``."""
    return owner == path or inside(owner, path)


def _analyse_block(
    path: str, module: nn.Module, record: Any, config: MHCConfig, unused: tuple = ((), -1)
) -> BlockAnalysis:
    """:func:`blocks.analyse_block`, with any unexpected failure reported as a CaptureError
    that names the block (the original exception is chained as ``__cause__``)."""
    try:
        return blocks.analyse_block(path, module, record, config, unused)
    except MHCError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the block's name
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        first = (str(root).strip().splitlines() or [""])[0]
        raise CaptureError(
            f"could not trace block {path or '(root)'!r} ({type(module).__name__}) for rewriting: "
            f"{type(root).__name__}: {first}; pass example_inputs= of one ordinary forward call "
            "(for Hugging Face models also try use_cache=False)"
        ) from err


def _filter_blocks(candidates: list[str], modules: dict[str, nn.Module], filter_fn: Optional[FilterFn]) -> list[str]:
    """The candidate block paths that ``filter_fn(module, fqn)`` accepts (all when ``None``)."""
    if filter_fn is None:
        return candidates
    if not callable(filter_fn):
        raise MHCConfigError(f"filter_fn must be a callable (module, fqn) -> bool, got {filter_fn!r}")
    kept = [p for p in candidates if filter_fn(modules[p], p)]
    if not kept:
        raise MHCConfigError(
            f"filter_fn rejected all {len(candidates)} candidate blocks "
            f"({', '.join(repr(p or '(root)') for p in candidates[:4])}{', ...' if len(candidates) > 4 else ''}); "
            "nothing would be converted: let it accept at least one of these paths"
        )
    return kept


def _split_long_skips(residuals: list, module_path: Callable, modules: dict[str, nn.Module]) -> tuple[list, list[str]]:
    """The residual adds of single blocks, and one note per *long skip*: an add whose skip
    enters its branch in one element of a ``ModuleList``/``ModuleDict`` and is added back in
    another (CPM-Ant's position bias, fed to every layer's attention scores: from layer 1
    on, the scores are computed from it through layer 0). Left as plain adds, so each
    layer of the stack stays its own block."""
    kept, notes = [], []
    for r in residuals:
        owner = owner_module(r, module_path)
        if owner and isinstance(modules.get(owner), (nn.ModuleList, nn.ModuleDict)):
            notes.append(
                f"{module_path(r.add)}: the add's skip enters its branch in another element of "
                f"{owner} (a skip across the layers of a stack, such as a bias shared by every "
                "layer); not rewritten, each layer is converted on its own"
            )
        else:
            kept.append(r)
    return kept, notes


def _called_owner(path: str, modules: dict[str, nn.Module]) -> str:
    """``path``, or its nearest parent that is called: a ``ModuleList``/``ModuleDict`` that
    holds the adds' modules is a container, never called itself."""
    while path and isinstance(modules[path], (nn.ModuleList, nn.ModuleDict)):
        path = path.rpartition(".")[0]
    return path


def _link_chains(analyses: list[BlockAnalysis], records: dict) -> list[str]:
    """Link block i to block j when j's stream input *is* i's stream output tensor.

    Returns one note per chain cut: where a block follows another without being linked
    to it, the reason the streams are collapsed and expanded again there.
    """
    outs = [blocks.stream_out_value(a, records[a.path]) for a in analyses]
    chain = -1
    notes = []
    for j, b in enumerate(analyses):
        x_in = blocks.stream_in_value(b)
        for i in range(j):
            a = analyses[i]
            if (
                outs[i] is not None
                and a.calls == b.calls == 1
                and outs[i] is x_in
                and not a.link_out
                and a.channel_dim == b.channel_dim
                and a.output_leaf not in records[a.path].read_outside
            ):
                a.link_out = b.link_in = True
                b.chain = a.chain
                break
        if b.chain < 0:
            chain += 1
            b.chain = chain
            if j > 0:
                notes.append(f"chain cut before {b.path or '(root)'}: {_cut_reason(analyses[j - 1], outs[j - 1], b, x_in, records)}")
    return notes


def _cut_reason(a: BlockAnalysis, out: Any, b: BlockAnalysis, x_in: Any, records: dict) -> str:
    """Why block ``b`` does not continue the streams of the block ``a`` called before it."""
    if b.stream_input is None:
        return "its first connection's skip is computed inside the block, not passed in"
    if a.calls > 1 or b.calls > 1:
        shared = a if a.calls > 1 else b
        return (f"{shared.path} is called {shared.calls} times per forward (weight-shared): "
                "its streams are expanded and collapsed within each call")
    if out is None:
        return f"{a.path or '(root)'} returns no value that carries its streams"
    if a.link_out:
        return f"{a.path or '(root)'}'s streams already continue into another block"
    if out is x_in and a.output_leaf in records[a.path].read_outside:
        return (f"the parent also reads {a.path or '(root)'}'s output itself ({records[a.path].read_outside[a.output_leaf]}"
                " outside any block, e.g. to keep a memory of hidden states), so it must stay one stream")
    if a.channel_dim != b.channel_dim:
        return f"the channel axis changes ({a.channel_dim} in {a.path}, {b.channel_dim} here)"
    if isinstance(out, torch.Tensor) and isinstance(x_in, torch.Tensor) and out.shape != x_in.shape:
        return (f"the parent passes on a value of another shape ({list(out.shape)} -> "
                f"{list(x_in.shape)}): a downsampling stage, or another stream (a decoder after its encoder)")
    return (f"its stream input is not {a.path or '(root)'}'s output: the parent computes on "
            "that output before passing it on (a norm, a scale), or the stream starts anew "
            "(a decoder's own embeddings)")


def mhc_compile(
    model: nn.Module,
    n_streams: int = 4,
    *,
    mode: str = "mhc",
    init: str = "preserve",
    example_inputs: Any = None,
    backend: str = "auto",
    sinkhorn_iters: int = 20,
    collapse: str = "mean",
    channel_dim: Optional[int] = None,
    rms_eps: float = 1e-6,
    fuse_adjacent: bool = True,
    recompute_streams: bool = True,
    stream_dtype: Optional[torch.dtype] = None,
    recompute: Optional[str] = None,
    deterministic: bool = False,
    config: Optional[MHCConfig] = None,
    filter_fn: Optional[FilterFn] = None,
) -> nn.Module:
    """Rewrite ``model``'s residual connections into ``n_streams``-stream mHC, in place.

    Args:
        model: any ``nn.Module`` whose forward contains residual adds ``x + F(x)``.
        n_streams: number of streams ``n`` (1..8).
        mode: ``"mhc"``, ``"hc"`` (unconstrained) or ``"residual"`` (analyse only: the
            model is not changed and ``is_converted`` stays False).
        init: ``"preserve"`` (same outputs as the original at step 0) or ``"paper"``.
        example_inputs: one forward call's inputs (tensor, tuple, dict or
            ``(args, kwargs)``); synthesised for Hugging Face models when omitted.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (reference ops).
        sinkhorn_iters, collapse, channel_dim, rms_eps: see :class:`MHCConfig`.
        fuse_adjacent: where a block's connection feeds the next one (attention then MLP),
            run the first's post and the second's pre as one fused op, and let a pre side
            compute the Llama-style RMSNorm that follows it in no-grad decode calls (on by
            default; ``False`` keeps them separate).
        recompute_streams: with ``fuse_adjacent``, the backward recomputes the stream state
            between a block's two connections instead of storing it (on by default: one
            n-stream tensor less stored per block, see :class:`MHCConfig`).
        stream_dtype: dtype of the n streams; ``None`` (default): the autocast dtype for a
            float32 residual under autocast, the residual's dtype otherwise;
            ``torch.float32`` keeps float32 streams under autocast.
        recompute: ``"mhc"`` recomputes the mHC ops (and the block's other cheap ops) in
            backward instead of storing their outputs; ``None`` (default) stores them.
        deterministic: bitwise-identical gradients run to run from the fused kernels (also
            on under ``torch.use_deterministic_algorithms(True)``); costs a little time in
            the post backward.
        config: all the options above as one :class:`MHCConfig` (torchao style); then
            leave those keywords at their defaults.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks which candidate blocks are
            converted (e.g. every other layer); rejected blocks keep their plain residual
            adds. ``None`` converts every block.

    Returns:
        The same model object, converted: same call signature and outputs; original
        parameters and state_dict keys kept; new parameters in ``<block>.mhc.<i>``. A
        Hugging Face model's ``config.mhc`` records the options (``save_pretrained``
        writes them to config.json; :func:`mhc_compile.from_pretrained` reads them).

    Raises:
        MHCConfigError, NoResidualError, ConversionError, CaptureError: with the reason;
        the model is left unchanged.
    """
    options = dict(
        n_streams=n_streams, mode=mode, init=init, backend=backend,
        sinkhorn_iters=sinkhorn_iters, collapse=collapse, channel_dim=channel_dim, rms_eps=rms_eps,
        fuse_adjacent=fuse_adjacent, recompute_streams=recompute_streams, stream_dtype=stream_dtype,
        recompute=recompute,
        deterministic=deterministic,
    )
    if disabled():
        logger.warning(
            "%s=%s: mhc_compile returns %s unchanged",
            DISABLE_ENV, os.environ.get(DISABLE_ENV), type(model).__name__,
        )
        return model
    config = _resolve_config(options, config)
    saved_options.warn_if_dropped_checkpoint(model)
    return convert(model, config, example_inputs=example_inputs, filter_fn=filter_fn)


def _resolve_config(options: dict[str, Any], config: Optional[MHCConfig]) -> MHCConfig:
    """One :class:`MHCConfig` from the keywords or from ``config=`` (not both)."""
    if config is None:
        return MHCConfig(**options)
    if not isinstance(config, MHCConfig):
        raise MHCConfigError(f"config must be an mhc_compile.MHCConfig, got {type(config).__name__}")
    defaults = MHCConfig()
    conflicts = {k: v for k, v in options.items() if v != getattr(defaults, k)}
    if conflicts:
        named = ", ".join(f"{k}={v!r}" for k, v in conflicts.items())
        raise MHCConfigError(
            f"mhc_compile got config= and also {named}; pass the options one way: either "
            f"config=MHCConfig(..., {named}) or the keywords without config="
        )
    return config


def convert(
    model: nn.Module, config: MHCConfig, *, example_inputs: Any = None, filter_fn: Optional[FilterFn] = None
) -> nn.Module:
    """:func:`mhc_compile` with a ready :class:`MHCConfig` (no ``MHC_DISABLE`` switch, no
    checkpoint warning): used by the loaders in :mod:`mhc_compile.checkpoint`."""
    if isinstance(model, nn.Module) and is_converted(model):
        raise ConversionError(
            f"{type(model).__name__} is already converted by mhc_compile; convert the "
            "original model once (build a fresh one to change options)"
        )
    own = hyper_connection_modules(model) if isinstance(model, nn.Module) else []
    if own:
        raise ConversionError(
            f"{type(model).__name__} already carries hyper-connections of its own "
            f"({type(model.get_submodule(own[0])).__name__} at {own[0]!r} and {len(own) - 1} more): "
            "its residual is already n mixed streams; mhc_compile would stack a second set on "
            "them. Train it as it is (or convert the plain-residual variant of the architecture)"
        )
    if isinstance(model, nn.Module):
        _check_backend_device(model, config)
    if config.backend != "torch":
        from .ops import library

        library.check_backend(config.backend)
    args, kwargs = resolve_example_inputs(model, example_inputs)
    analysis = analyse(model, config, (args, kwargs), filter_fn)
    if config.mode == "residual":
        model._mhc_residual_analysis = analysis  # for inspect(); the model is not converted
        return model
    _install_checked(model, analysis, config, args, kwargs)
    model._mhc_analysis = analysis
    model.__dict__.pop("_mhc_residual_analysis", None)
    saved_options.record_options(model, config, [b.path for b in analysis.blocks])
    initialization.install_hf_init_hook(model)
    hf_config = getattr(model, "config", None)
    if config.recompute and getattr(hf_config, "use_cache", False):
        hf_config.use_cache = False  # a key/value cache is state that recomputation would append to twice
        logger.info("mhc_compile: recompute=%r sets model.config.use_cache = False", config.recompute)
    logger.info(
        "mhc_compile: %d connections in %d blocks rewritten to %d-stream %s",
        sum(len(b.connections) for b in analysis.blocks), len(analysis.blocks), config.n_streams, config.mode,
    )
    return model


def _install_checked(model: nn.Module, analysis: ModelAnalysis, config: MHCConfig, args: tuple, kwargs: dict) -> None:
    """Install every block's rewrite, then check the converted model on probe inputs
    (:mod:`mhc_compile.verify`); on any failure every block is restored."""
    calls = verify.probes(args, kwargs)
    reference = verify.run_probes(model, calls)
    modules = dict(model.named_modules())
    installed = []
    try:
        for block in analysis.blocks:
            runtime.install(modules[block.path], block, config)
            installed.append(modules[block.path])
        verify.check(model, calls, reference, compare=config.init == "preserve", stream_dtype=config.stream_dtype)
    except Exception:
        for module in installed:
            runtime.uninstall(module)
        raise


def _check_backend_device(model: nn.Module, config: MHCConfig) -> None:
    """``backend="triton"`` needs CUDA parameters (or ``TRITON_INTERPRET=1`` on the CPU)."""
    if config.backend != "triton" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    devices = sorted({str(p.device) for p in model.parameters() if p.device.type not in ("cuda", "meta")})
    if devices:
        raise MHCConfigError(
            f"backend='triton' runs the fused kernels on CUDA, but {type(model).__name__} has "
            f"parameters on {', '.join(devices)}; use backend='auto' (Triton on CUDA, the "
            "reference ops elsewhere) or backend='torch', or move the model to CUDA "
            "(model.cuda()) before converting"
        )


def inspect(model: nn.Module, example_inputs: Any = None, *, print_table: bool = True) -> list[dict]:
    """One row per (to be) rewritten connection; printed as a table.

    Works on a converted model (what was rewritten) and on a plain one (what would be).
    """
    analysis = getattr(model, "_mhc_analysis", None) or getattr(model, "_mhc_residual_analysis", None)
    if analysis is None:
        analysis = analyse(model, MHCConfig(mode="residual"), example_inputs)
    rows = analysis.rows()
    if print_table:
        from tabulate import tabulate

        print(tabulate(rows, headers="keys", tablefmt="github"))
        for note in analysis.cuts:
            print(f"cut: {note}")
    return rows


def hyper_connected(n_streams: int = 4, **options: Any) -> Callable[[T], T]:
    """Decorator: convert what a model class or factory function builds.

    ``@hyper_connected(n_streams=4)`` on an ``nn.Module`` subclass converts each instance
    at the end of its ``__init__`` (instances of further subclasses are left alone); on
    a function, converts the module it returns. ``MHC_DISABLE=1`` turns it into a no-op.
    """

    def decorate(obj: T) -> T:
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            original_init = obj.__init__

            @functools.wraps(original_init)
            def __init__(self, *args, **kwargs):
                original_init(self, *args, **kwargs)
                if type(self) is obj:
                    mhc_compile(self, n_streams, **options)

            obj.__init__ = __init__
            return obj
        if callable(obj):

            @functools.wraps(obj)
            def factory(*args, **kwargs):
                return mhc_compile(obj(*args, **kwargs), n_streams, **options)

            return factory  # type: ignore[return-value]
        raise TypeError(f"hyper_connected decorates an nn.Module class or a factory, not {obj!r}")

    return decorate


__all__ = [
    "mhc_compile", "convert", "hyper_connected", "inspect", "analyse", "is_converted", "mhc_parameters",
    "NoResidualError", "ConversionError", "CaptureError", "DISABLE_ENV", "FilterFn",
]
