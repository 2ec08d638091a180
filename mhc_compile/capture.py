"""Model -> FX graphs.

Two captures, each with one job:

* :func:`export_model` captures the *whole* model once with ``torch.export`` (non-strict):
  an ATen graph whose nodes carry ``nn_module_stack``. It is used only to *analyse*:
  where the residual adds are and which module owns each of them.
* :func:`trace_block` captures one owning block with ``torch.fx`` symbolic tracing at the
  torch level, calling into child modules where that traces and keeping a child as an
  opaque module call where it does not (attention implementations usually). Python
  arguments that were ``None`` or constants in the recorded call are specialised; the
  rewritten block keeps one traced variant per specialisation and per ``training`` flag.

:func:`record_calls` runs one sample forward with hooks to learn each block's actual call
arguments (for tracing and shape propagation) and outputs (for linking blocks into chains).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

STATIC_TYPES = (bool, int, float, str, torch.dtype, torch.device)


class CaptureError(RuntimeError):
    """The model (or one of its blocks) could not be captured as a graph."""


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
    """Random inputs for a Hugging Face model built from a config (``input_ids`` or ``pixel_values``)."""
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", None)
    if config is None or main_input is None:
        raise CaptureError(
            f"cannot synthesise example inputs for {type(model).__name__}: it is not a "
            "Hugging Face model with a config; pass example_inputs= (a tensor, a tuple of "
            "arguments or a dict of keyword arguments for one forward call)"
        )
    device = _model_device(model)
    kwargs: dict[str, Any] = {}
    if main_input == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 2
        kwargs["input_ids"] = torch.randint(0, vocab, (batch, seq_len), device=device)
    elif main_input == "pixel_values":
        channels = getattr(config, "num_channels", 3)
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (tuple, list)) else size
        kwargs["pixel_values"] = torch.randn(batch, channels, size, size, device=device)
    else:
        raise CaptureError(
            f"cannot synthesise example inputs for main input {main_input!r} of "
            f"{type(model).__name__}; pass example_inputs="
        )
    return (), kwargs


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- sample runs


def without_cache(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` with ``use_cache=False`` where the forward takes it and the caller did not say.

    A key/value cache is state: a sample forward that filled one would hand every block a
    cache already holding the sample's keys, and a block traced with it would replay them.
    """
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


@contextlib.contextmanager
def side_effect_free(model: nn.Module):
    """Run analysis forwards without changing buffers (batch-norm statistics) or RNG state."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield
        finally:
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


def record_calls(model: nn.Module, paths: list[str], args: tuple, kwargs: dict) -> dict[str, CallRecord]:
    """Run one forward and record the call arguments and outputs of the modules at ``paths``."""
    modules = dict(model.named_modules())
    records = {p: CallRecord(p) for p in paths}
    counter = [0]
    handles = []

    def pre_hook(path):
        def hook(mod, a, kw):
            rec = records[path]
            rec.calls += 1
            if rec.calls == 1:
                rec.args, rec.kwargs, rec.order = a, dict(kw), counter[0]
                counter[0] += 1

        return hook

    def post_hook(path):
        def hook(mod, a, kw, out):
            if records[path].calls == 1:
                records[path].output = out

        return hook

    for p in paths:
        handles.append(modules[p].register_forward_pre_hook(pre_hook(p), with_kwargs=True))
        handles.append(modules[p].register_forward_hook(post_hook(p), with_kwargs=True))
    kwargs = without_cache(model, kwargs)
    try:
        with side_effect_free(model):
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


def export_model(model: nn.Module, args: tuple, kwargs: dict) -> ExportedGraph:
    """Capture ``model`` with ``torch.export`` (non-strict) for analysis."""
    wrapper = _TensorOutputs(model)
    kwargs = without_cache(model, kwargs)
    try:
        with side_effect_free(model):
            ep = torch.export.export(wrapper, (args, kwargs), strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CaptureError(
            f"torch.export (non-strict) could not capture {type(model).__name__} for "
            f"analysis: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "Pass example_inputs= that match one ordinary forward call (for Hugging Face "
            "models also use_cache=False)."
        ) from err
    params = {
        spec.arg.name
        for spec in ep.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.PARAMETER
    }
    return ExportedGraph(ep.graph, params)


# --------------------------------------------------------------------------- per-block tracing


class BlockTracer(fx.Tracer):
    """Traces one block, inlining child modules where possible.

    Leaves: ``torch.nn`` layers, normalisation modules (any class whose name holds
    "norm"), and any child whose own code cannot be traced (it is retried as an opaque
    call, so attention implementations with data-dependent Python stay modules).
    """

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math,))
        self.forced_leaves: set[str] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.forced_leaves:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if type(m).__module__.startswith("torch.nn"):
            return True
        return "norm" in type(m).__name__.lower()

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        before = list(self.graph.nodes)
        stack = self.module_stack.copy()
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # noqa: BLE001 - fall back to an opaque call of this child
            for node in reversed(list(self.graph.nodes)[len(before) :]):
                self.graph.erase_node(node)
            self.module_stack = stack
            self.forced_leaves.add(qualname)
            return super().call_module(m, forward, args, kwargs)


@dataclass
class BlockSignature:
    """A block's forward signature, split into traced placeholders and specialised constants."""

    params: list[inspect.Parameter]
    dynamic: list[str]  # placeholder names, in call order
    static: dict[str, Any]  # specialised names -> values
    var_keyword: Optional[str]
    passthrough: frozenset = frozenset()  # constants/None that never change the graph


_DYNAMIC = "<mhc:dynamic>"  # a plain string, so that torch.compile can hash specialisation keys


def classify(value: Any) -> Any:
    """The specialisation key of one argument: its value if static, else a marker."""
    return value if value is None or isinstance(value, STATIC_TYPES) else _DYNAMIC


def make_key(training: bool, values: dict, passthrough: frozenset = frozenset()) -> tuple:
    """Specialisation key: the training flag and every non-passthrough constant argument."""
    return (training,) + tuple(
        (name, _DYNAMIC if name in passthrough else classify(values[name])) for name in sorted(values)
    )


def unwrapped_forward(block: nn.Module):
    """The block class's own forward, below wrappers such as HF's checkpointing layer."""
    return inspect.unwrap(type(block).forward)


def bind_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, list[inspect.Parameter], Optional[str]]:
    """Bind a recorded call to the block's forward: ``{name: value}`` with ``**kwargs`` flattened."""
    fn = unwrapped_forward(block)
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1:]  # drop self
    bound = sig.bind(block, *args, **kwargs)
    bound.apply_defaults()
    values: dict[str, Any] = {}
    var_kw = None
    for p in params:
        value = bound.arguments.get(p.name, p.default)
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise CaptureError(
                    f"{type(block).__name__}.forward received *{p.name} positional "
                    "arguments; blocks called with *args cannot be rewritten"
                )
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = p.name
            values.update(value or {})
            continue
        values[p.name] = value
    return values, params, var_kw


def split_signature(
    values: dict, params: list[inspect.Parameter], var_kw: Optional[str], passthrough: frozenset = frozenset()
) -> BlockSignature:
    dynamic = [n for n, v in values.items() if classify(v) is _DYNAMIC or n in passthrough]
    static = {n: v for n, v in values.items() if n not in dynamic}
    return BlockSignature(params, dynamic, static, var_kw, frozenset(passthrough))


def _graph_shape(graph: fx.Graph, probes: Optional[dict] = None) -> list:
    """Nodes as comparable tuples; placeholders named in ``probes`` read as their values."""
    probes = probes or {}

    def norm(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.op == "placeholder" and a.target in probes:
                return ("const", repr(probes[a.target]))
            return ("node", a.name)
        if isinstance(a, (tuple, list)):
            return tuple(norm(b) for b in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return ("const", repr(a))

    return [
        (n.op, str(n.target), norm(n.args), norm(n.kwargs)) for n in graph.nodes if n.op != "placeholder"
    ]


def find_passthrough(block: nn.Module, values: dict, signature: BlockSignature, training: bool) -> frozenset:
    """Constant or ``None`` arguments whose value does not change the traced graph.

    An attention mask that the block only hands to its attention module is such an
    argument: tracing it as a placeholder gives the same graph with the value swapped for
    a placeholder. Those arguments are not specialised, so a caller that passes a tensor
    where the sample call passed ``None`` (as Hugging Face models do under
    ``torch.compile``) reuses the same graph.
    """
    base = _graph_shape(trace_block(block, values, signature, training, shapes=False).graph)

    def same_graph(names: list[str]) -> bool:
        probe = split_signature(values, signature.params, signature.var_keyword, frozenset(names))
        try:
            gm = trace_block(block, values, probe, training, shapes=False)
        except CaptureError:
            return False
        return _graph_shape(gm.graph, {n: values[n] for n in names}) == base

    found = [name for name in signature.static if same_graph([name])]
    return frozenset(found) if found and same_graph(found) else frozenset()


def _copy_state(value: Any) -> Any:
    """A copy of a stateful argument (a key/value cache object) for a shape-propagation run.

    Shape propagation runs the block once; a cache it was given would keep that run's keys
    and the real call would then append them a second time. Tensors are not copied (the
    block does not change its inputs in place), static values need no copy.
    """
    if isinstance(value, torch.Tensor) or classify(value) is not _DYNAMIC:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in tree_leaves(value)):
        return value
    try:
        return copy.deepcopy(value)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CaptureError(
            f"cannot copy the {type(value).__name__} argument for a shape-propagation run "
            f"({type(err).__name__}: {err}); call the converted model once without it "
            "(e.g. use_cache=False) or pass example_inputs= of the form used at run time"
        ) from err


def trace_block(
    block: nn.Module, values: dict, signature: BlockSignature, training: bool, shapes: bool = True
) -> fx.GraphModule:
    """Trace ``block`` for one specialisation; shapes are propagated from ``values``.

    The returned GraphModule's placeholders are ``signature.dynamic`` in order; its
    ``get_attr``/``call_module`` targets are paths relative to ``block``.
    """
    fn = unwrapped_forward(block)
    names = signature.dynamic
    positional_only = [p.name for p in signature.params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    call_parts = []
    for name in positional_only:
        call_parts.append(name if name in names else f"_static[{name!r}]")
    for name in values:
        if name in positional_only:
            continue
        call_parts.append(f"{name}={name}" if name in names else f"{name}=_static[{name!r}]")
    src = (
        f"def _mhc_trace_root(self, {', '.join(names)}):\n"
        f"    return _orig(self, {', '.join(call_parts)})\n"
    )
    scope: dict[str, Any] = {"_orig": fn, "_static": signature.static}
    exec(compile(src, f"<mhc trace root of {type(block).__name__}>", "exec"), scope)  # noqa: S102
    cls = type(block)
    was_training = block.training
    tracer = BlockTracer()
    tracer.traced_func_name = "_mhc_trace_root"
    setattr(cls, "_mhc_trace_root", scope["_mhc_trace_root"])
    try:
        block.train(training)
        graph = tracer.trace(block)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CaptureError(
            f"torch.fx could not trace the forward of {type(block).__name__} "
            f"({type(err).__name__}: {err}); this block's own code (not its children) "
            "must be traceable to be rewritten"
        ) from err
    finally:
        delattr(cls, "_mhc_trace_root")
        block.train(was_training)
    gm = fx.GraphModule(block, graph)
    if not shapes:
        return gm
    with side_effect_free(block):
        block.train(training)
        try:
            ShapeProp(gm).propagate(*[_copy_state(values[n]) for n in names])
        finally:
            block.train(was_training)
    return gm
