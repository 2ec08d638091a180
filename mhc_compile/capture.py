"""Whole-model capture: example inputs, the sample forward, the analysis export.

* :func:`resolve_example_inputs` turns the user's ``example_inputs`` (or a Hugging Face
  model's config) into one forward call's ``(args, kwargs)``.
* :func:`export_model` captures the *whole* model once with ``torch.export`` (non-strict):
  an ATen graph whose nodes carry ``nn_module_stack``. It is used only to *analyse*:
  where the residual adds are and which module owns each of them.
* :func:`record_calls` runs one sample forward with hooks to learn each block's actual
  call arguments (for tracing and shape propagation) and outputs (for linking blocks
  into chains), and which outputs the code between the blocks reads (such an output
  cannot carry n streams).

Per-block tracing (the graphs that are rewritten) lives in :mod:`mhc_compile.trace`.
See ``docs/design.md`` for how the pieces fit.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import CaptureError, first_line



# --------------------------------------------------------------------------- inputs


def resolve_example_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``; synthesised for Hugging Face models.

    Accepts a tensor, a tuple of positional arguments, a dict of keyword arguments, or an
    ``(args_tuple, kwargs_dict)`` pair.
    """
    if example_inputs is None:
        return synthesize_hf_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, (tuple, list))
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], dict)
    ):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of arguments, a dict of keyword "
        f"arguments or an (args, kwargs) pair; got {type(example_inputs).__name__}"
    )


def synthesize_hf_inputs(model: nn.Module, batch: int = 2, seq_len: int = 8) -> tuple[tuple, dict]:
    """Random inputs for a Hugging Face model built from a config.

    Every input the forward takes among ``input_ids``, ``decoder_input_ids`` (encoder-
    decoders), ``pixel_values``, ``input_features`` and ``input_values`` is synthesised
    when it is the model's main input or the model needs it beside the main one (CLIP's
    ``input_ids`` and ``pixel_values``, T5's ``decoder_input_ids``). Sizes come from the
    config or its ``text_config`` / ``vision_config`` / ``audio_config``.
    """
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", None)
    if config is None or main_input is None:
        raise CaptureError(
            f"cannot synthesise example inputs for {type(model).__name__}: it is not a "
            "Hugging Face model with a config; pass example_inputs= (a tensor, a tuple of "
            "arguments or a dict of keyword arguments for one forward call)"
        )
    takes = set(inspect.signature(model.forward).parameters)
    device = _model_device(model)
    wanted = [main_input]
    if main_input == "input_ids" and "pixel_values" in takes and _sub_config(config, "vision") is not None:
        wanted.append("pixel_values")
    if main_input == "pixel_values" and "input_ids" in takes and _sub_config(config, "text") is not None:
        wanted.append("input_ids")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in takes:
        wanted.append("decoder_input_ids")
    kwargs: dict[str, Any] = {}
    for name in wanted:
        value = _synthesize_input(name, config, batch, seq_len, device)
        if value is None:
            raise CaptureError(
                f"cannot synthesise example inputs for input {name!r} of "
                f"{type(model).__name__}; pass example_inputs= (a dict of keyword arguments)"
            )
        kwargs[name] = value
    return (), kwargs


def _sub_config(config: Any, kind: str) -> Any:
    """``config.<kind>_config`` (``text``, ``vision``, ``audio``), or ``None``."""
    return getattr(config, f"{kind}_config", None)


def _config_value(config: Any, names: tuple[str, ...], kinds: tuple[str, ...], default: Any) -> Any:
    """The first of ``names`` set on ``config`` or on one of its sub-configs ``kinds``."""
    for cfg in (config, *[_sub_config(config, k) for k in kinds]):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None:
                return value
    return default


def _synthesize_input(name: str, config: Any, batch: int, seq_len: int, device: torch.device) -> Any:
    """One random input tensor named ``name`` sized from ``config``; ``None`` if unknown."""
    if name in ("input_ids", "decoder_input_ids"):
        vocab = _config_value(config, ("vocab_size",), ("text", "decoder"), 2)
        return torch.randint(0, min(int(vocab), 1 << 15), (batch, seq_len), device=device)
    if name == "pixel_values":
        channels = _config_value(config, ("num_channels",), ("vision",), 3)
        size = _config_value(config, ("image_size",), ("vision",), 32)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return torch.randn(batch, channels, size, size, device=device)
    if name == "input_features":
        mels = _config_value(config, ("num_mel_bins",), ("audio",), None)
        if mels is not None:  # Whisper-style [B, mels, frames]: frames fixed by the encoder
            frames = 2 * _config_value(config, ("max_source_positions",), ("audio",), 1500)
            return torch.randn(batch, mels, frames, device=device)
        feats = _config_value(config, ("input_feat_per_channel",), ("audio",), None)
        if feats is not None:  # Speech2Text-style [B, frames, features * channels]
            channels = _config_value(config, ("input_channels",), ("audio",), 1)
            return torch.randn(batch, 4 * seq_len, feats * channels, device=device)
        return None
    if name == "input_values":
        return torch.randn(batch, 400 * seq_len, device=device)
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- sample runs

STATIC_TYPES = (bool, int, float, str, torch.dtype, torch.device)


def is_static(value: Any) -> bool:
    """``None``, a Python constant, or a tuple/list of them (``input_dimensions=(7, 7)``)."""
    if value is None or isinstance(value, STATIC_TYPES):
        return True
    return isinstance(value, (tuple, list)) and all(is_static(v) for v in value)


def copy_state(value: Any) -> Any:
    """A copy of a stateful argument (a key/value cache object) for a sample run.

    Shape propagation runs the block once; a cache it was given would keep that run's keys
    and the real call would then append them a second time. Tensors are not copied (the
    block does not change its inputs in place), static values need no copy; an object is
    copied with every tensor inside it detached and cloned (caches hold activations that
    are part of an autograd graph, which ``copy.deepcopy`` refuses).
    """
    if isinstance(value, torch.Tensor) or is_static(value):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in tree_leaves(value)):
        return value
    try:
        return _copy_detached(value, {})
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CaptureError(
            f"cannot copy the {type(value).__name__} argument for a shape-propagation run "
            f"({type(err).__name__}: {err}); call the converted model once without it "
            "(e.g. use_cache=False) or pass example_inputs= of the form used at run time"
        ) from err


def _copy_detached(value: Any, memo: dict) -> Any:
    """Deep copy of containers and plain objects; tensors detached and cloned; modules,
    functions and other objects without a ``__dict__`` shared."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, torch.Tensor):
        out: Any = value.detach().clone()
    elif isinstance(value, (list, tuple)):
        items = [_copy_detached(v, memo) for v in value]
        out = type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    elif isinstance(value, dict):
        out = type(value)()
        memo[id(value)] = out
        for k, v in value.items():
            out[k] = _copy_detached(v, memo)
    elif isinstance(value, nn.Module) or callable(value) and not hasattr(value, "__dict__"):
        out = value
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        out = copy.copy(value)
        memo[id(value)] = out
        for k, v in vars(value).items():
            setattr(out, k, _copy_detached(v, memo))
    else:
        out = value
    memo[id(value)] = out
    return out




def without_cache(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` with ``use_cache=False`` where the forward takes it and the caller did not say:
    for the analysis export and the conversion's checks, whose outputs need no cache.

    The sample forward (:func:`record_calls`) keeps the caller's setting, as the model will
    be called, and snapshots each block's cache argument at its call (:func:`copy_state`).
    """
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


_MODULE_INTERNALS = ("_parameters", "_buffers", "_modules")


class _Same:
    """Compares by identity: ``module_state`` snapshots are equal when nothing was reassigned."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Same) and other.value is self.value


def module_state(m: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """Every submodule's plain attributes and buffers as they are now (by reference):
    state a forward may reassign (``self.conv1d_state = ...``)."""
    return [
        (mod, {k: _Same(v) for k, v in vars(mod).items() if k not in _MODULE_INTERNALS},
         {k: _Same(v) for k, v in mod._buffers.items()})
        for mod in m.modules()
    ]


def restore_module_state(state: list) -> None:
    """Undo reassignments since :func:`module_state` (new attributes are removed)."""
    for mod, attrs, buffers in state:
        for k in [k for k in vars(mod) if k not in _MODULE_INTERNALS and k not in attrs]:
            delattr(mod, k)
        for k, v in attrs.items():
            object.__setattr__(mod, k, v.value)
        mod._buffers.clear()
        mod._buffers.update({k: v.value for k, v in buffers.items()})


@contextlib.contextmanager
def side_effect_free(model: nn.Module):
    """Run analysis forwards without changing buffers (batch-norm statistics), module
    attributes (a recurrent state kept on the module) or RNG state."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    state = module_state(model)
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield
        finally:
            restore_module_state(state)
            buffers = dict(model.named_buffers())
            for name, value in saved.items():
                if name in buffers:
                    buffers[name].copy_(value)


@dataclass
class CallRecord:
    """What one module saw and returned during the sample forward."""

    path: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Any = None
    calls: int = 0
    order: int = -1
    # output leaf index -> the first op that code outside every block applied to it
    # (XLNet's parent slices each layer's output into its memory)
    read_outside: dict[int, str] = field(default_factory=dict)


# ops that read only a tensor's metadata, not its values
_METADATA_OPS = {"__get__", "size", "dim", "__len__", "numel", "nelement", "ndimension", "stride",
                 "is_contiguous", "is_floating_point", "is_complex", "element_size", "get_device",
                 "data_ptr", "storage_offset"}


class _OutsideReads(TorchFunctionMode):
    """Notes the torch ops that run outside every recorded block on a block's output."""

    def __init__(self, records: dict[str, CallRecord]) -> None:
        super().__init__()
        self.records = records
        self.depth = 0  # recorded blocks now running
        self.watched: dict[int, tuple[str, int]] = {}  # id(output leaf) -> (path, leaf index)

    def watch(self, path: str, output: Any) -> None:
        for idx, leaf in enumerate(tree_leaves(output)):
            if isinstance(leaf, torch.Tensor):
                self.watched[id(leaf)] = (path, idx)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and self.watched and getattr(func, "__name__", "") not in _METADATA_OPS:
            for leaf in tree_leaves((args, kwargs)):
                hit = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if hit is not None and out is not leaf:  # ``x.to(x.dtype)`` returns x: passed on, not read
                    self.records[hit[0]].read_outside.setdefault(hit[1], getattr(func, "__name__", str(func)))
        return out


def record_calls(model: nn.Module, paths: list[str], args: tuple, kwargs: dict) -> dict[str, CallRecord]:
    """Run one forward and record the call arguments and outputs of the modules at ``paths``,
    and the ops that code outside these modules applies to their outputs."""
    modules = dict(model.named_modules())
    records = {p: CallRecord(p) for p in paths}
    reads = _OutsideReads(records)
    counter = [0]
    handles = []

    def pre_hook(path):
        def hook(mod, a, kw):
            reads.depth += 1
            rec = records[path]
            rec.calls += 1
            if rec.calls == 1:  # caches as they are now: the forward appends to them later
                rec.args = tuple(copy_state(v) for v in a)
                rec.kwargs = {k: copy_state(v) for k, v in kw.items()}
                rec.order = counter[0]
                counter[0] += 1

        return hook

    def post_hook(path):
        def hook(mod, a, kw, out):
            reads.depth -= 1
            if records[path].calls == 1:
                records[path].output = out
                reads.watch(path, out)

        return hook

    for p in paths:
        handles.append(modules[p].register_forward_pre_hook(pre_hook(p), with_kwargs=True))
        handles.append(modules[p].register_forward_hook(post_hook(p), with_kwargs=True))
    try:
        with side_effect_free(model), reads:
            model(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CaptureError(
            f"the sample forward of {type(model).__name__} failed ({type(err).__name__}: {err}); "
            "pass example_inputs= that the model accepts"
        ) from err
    finally:
        for h in handles:
            h.remove()
    return records


# --------------------------------------------------------------------------- whole-model export


class _TensorOutputs(nn.Module):
    """Wraps a model so that export sees only tensors in the output (caches, ModelOutputs...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, args: tuple, kwargs: dict) -> list:
        out = self.inner(*args, **kwargs)
        return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclass
class ExportedGraph:
    """The analysis capture: an ATen graph plus helpers to read it."""

    graph: fx.Graph
    param_inputs: set[str]

    def module_path(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        path = path.replace("[", ".").replace("]", "").replace("'", "")
        if path == "inner":
            return ""
        return path[len("inner.") :] if path.startswith("inner.") else path

    def is_param(self, node: fx.Node) -> bool:
        return node.op == "placeholder" and node.name in self.param_inputs


_MASK_OF = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}


def with_default_masks(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` with an all-ones attention mask for each token-id input that has none.

    Hugging Face forwards build that default mask only outside compilation
    (``if attention_mask is None and not is_torchdynamo_compiling()``), so under
    ``torch.export`` LongT5's local attention receives ``None``; with no cache, an all-ones
    mask is what eager mode builds. Returns ``kwargs`` itself where nothing is added.
    """
    params = inspect.signature(model.forward).parameters
    added = {
        mask: torch.ones_like(kwargs[ids], dtype=torch.long)
        for ids, mask in _MASK_OF.items()
        if mask in params and kwargs.get(mask) is None and isinstance(kwargs.get(ids), torch.Tensor)
    }
    return {**kwargs, **added} if added else kwargs


def export_model(model: nn.Module, args: tuple, kwargs: dict) -> ExportedGraph:
    """Capture ``model`` with ``torch.export`` (non-strict) for analysis."""
    wrapper = _TensorOutputs(model)
    kwargs = without_cache(model, kwargs)
    printed = io.StringIO()  # export prints its partial graph where it stops: kept if we do not go on
    try:
        with side_effect_free(model), contextlib.redirect_stderr(printed):
            try:
                ep = torch.export.export(wrapper, (args, kwargs), strict=False)
            except Exception:  # noqa: BLE001 - retried once with the masks eager mode would make
                masked = with_default_masks(model, kwargs)
                if masked is kwargs:
                    raise
                ep = torch.export.export(wrapper, (args, masked), strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        if _is_data_dependent(err):
            return _trace_on_sample(wrapper, args, kwargs)
        sys.stderr.write(printed.getvalue())
        raise CaptureError(
            f"torch.export (non-strict) could not capture {type(model).__name__} for "
            f"analysis: {type(err).__name__}: {first_line(err)}. "
            "Pass example_inputs= that match one ordinary forward call (for Hugging Face "
            "models also use_cache=False)."
        ) from err
    sys.stderr.write(printed.getvalue())
    params = {
        spec.arg.name
        for spec in ep.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.PARAMETER
    }
    return ExportedGraph(ep.graph, params)




def _is_data_dependent(err: BaseException) -> bool:
    """``err`` (or its cause) is export's refusal of Python that branches on tensor values."""
    while err is not None:
        if "DataDependent" in type(err).__name__ or "data-dependent" in str(err).split("\n")[0]:
            return True
        err = err.__cause__
    return False


def _trace_on_sample(wrapper: nn.Module, args: tuple, kwargs: dict) -> ExportedGraph:
    """The analysis graph of a model whose Python branches on tensor values (a mixture of
    experts that loops over the experts the sample routes to): an ATen trace that runs on
    the sample's real values, so such branches follow the sample.

    The analysis only needs where the residual adds are and which module owns each; an
    expert the sample does not reach lies inside a branch and owns none. Each node is
    tagged with the module stack at its creation (what ``torch.export`` records as
    ``nn_module_stack``), kept up to date by hooks on every module.
    """
    from torch.func import functional_call
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    params = dict(wrapper.named_parameters())
    names = {m: n for n, m in wrapper.named_modules()}
    stack: list[dict] = [{}]

    def enter(mod, _args):
        top = dict(stack[-1])
        top[names.get(mod, "")] = (names.get(mod, ""), type(mod))
        stack.append(top)
        fx_traceback.current_meta["nn_module_stack"] = top

    def leave(mod, _args, _out):
        stack.pop()
        fx_traceback.current_meta["nn_module_stack"] = stack[-1]

    def run(p, a, kw):
        return functional_call(wrapper, p, (a, kw))

    handles = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with side_effect_free(wrapper.inner), fx_traceback.preserve_node_meta():
            gm = make_fx(run, tracing_mode="real", pre_dispatch=True, _error_on_data_dependent_ops=False)(
                params, args, kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CaptureError(
            f"{type(wrapper.inner).__name__}'s forward branches on tensor values, and tracing it on the "
            f"sample inputs failed too ({type(err).__name__}: {first_line(err)}); "
            "pass example_inputs= that match one ordinary forward call"
        ) from err
    finally:
        for h in handles:
            h.remove()
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return ExportedGraph(gm.graph, set(placeholders[: len(params)]))
