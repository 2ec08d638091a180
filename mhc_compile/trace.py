"""Per-block capture: one owning block's forward -> a torch-level FX graph.

:func:`trace_block` traces a block with ``torch.fx`` for one *specialisation* of its call:

* arguments that were ``None``, Python constants or tuples of constants in the call are
  baked in (``split_signature``); tensors and other objects (caches) are placeholders;
* tensor metadata that does not depend on sizes (``dtype``, ``device``, rank) reads
  as the concrete value from the call (:class:`BlockTracer` runs each op on the call's
  values while it traces), so ``if x.dtype == torch.float16:`` traces; the specialisation
  key (:func:`make_key`) holds every tensor argument's dtype, device and rank, so a call
  with other dtypes gets a graph of its own. Buffers used as operands get values as well.
  Sizes stay symbolic: one graph serves every batch size and sequence length; item
  assignment (``y[1:] += first``) records an in-place ``operator.setitem``;
* child modules are inlined where their code traces and kept as opaque module calls
  where it does not (attention implementations with data-dependent Python);
* ``assert`` on traced values becomes ``torch._assert``; a real tensor sliced by a
  symbolic size, a returned ``ModelOutput`` and an object made in the forward from no
  tensors (a fresh cache) become graph ops (see :meth:`BlockTracer.create_arg`);
* shapes are then propagated with the call's values (caches copied first: they are state).

:func:`find_passthrough` finds constant arguments that do not change the graph (an
attention mask handed straight to the attention module), so they are not specialised.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import dis
import inspect
import logging
import math
import operator
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves, tree_map

from .capture import CaptureError, copy_state, is_static, module_state, restore_module_state, side_effect_free
from .errors import first_line
from .heuristics import is_norm_module

logger = logging.getLogger("mhc_compile")
_DYNAMIC = "<mhc:dynamic>"  # a plain string, so that torch.compile can hash specialisation keys
# tensor metadata that does not depend on sizes: read concretely while tracing
_CONCRETE_ATTRS = ("dtype", "device", "is_cuda", "ndim", "is_sparse", "layout", "is_quantized")
_CONCRETE_METHODS = ("dim", "is_floating_point", "is_complex", "get_device", "element_size")


# --------------------------------------------------------------------------- specialisation


def classify(value: Any) -> Any:
    """The specialisation key of one argument: its value if static (lists as tuples), a
    tensor's dtype, device type and rank, an object's class, else a marker."""
    if isinstance(value, torch.Tensor):  # first: most arguments of a block call are tensors
        return (_DYNAMIC, value.dtype, value.device.type, value.dim())
    if is_static(value):
        return tuple(classify(v) for v in value) if isinstance(value, (tuple, list)) else value
    if is_state_object(value):  # a cache: traced code may branch on its type
        return (_DYNAMIC, f"{type(value).__module__}.{type(value).__qualname__}")
    return _DYNAMIC


def is_state_object(value: Any) -> bool:
    """A plain Python object argument (a key/value cache), not a tensor, module or container."""
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, (torch.Tensor, nn.Module, type, tuple, list, dict))
        and not callable(value)
    )


def constants_of(values: dict) -> tuple:
    """The part of a call's specialisation that is not tensor metadata: every constant
    argument's value and every object argument's type."""
    return tuple((n, classify(v)) for n, v in sorted(values.items()) if not isinstance(v, torch.Tensor))


def is_dynamic(value: Any) -> bool:
    """True for an argument that becomes a placeholder of the traced graph."""
    return not is_static(value)


def make_key(training: bool, values: dict, passthrough: frozenset = frozenset()) -> tuple:
    """Specialisation key: the training flag, every non-passthrough constant argument and
    the dtype/device of every tensor argument."""
    return (training,) + tuple(
        (name, _DYNAMIC if name in passthrough else classify(values[name])) for name in _sorted_names(tuple(values))
    )


_SORTED_NAMES: dict[tuple, tuple] = {}


def _sorted_names(names: tuple) -> tuple:
    """``sorted(names)``, remembered outside compilation: every call of a converted block
    makes its key (a plain dict: Dynamo traces it, where it would ignore an lru_cache)."""
    if torch.compiler.is_compiling():
        return tuple(sorted(names))
    found = _SORTED_NAMES.get(names)
    if found is None:
        if len(_SORTED_NAMES) > 1024:
            _SORTED_NAMES.clear()
        found = _SORTED_NAMES[names] = tuple(sorted(names))
    return found


@dataclass
class BlockSignature:
    """A block's forward signature, split into traced placeholders and specialised constants."""

    params: list[inspect.Parameter]
    dynamic: list[str]  # placeholder names, in call order
    static: dict[str, Any]  # specialised names -> values
    var_keyword: Optional[str]
    passthrough: frozenset = frozenset()  # constants/None that never change the graph


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
    """Placeholders (tensors, objects, and ``passthrough`` constants) vs baked-in constants."""
    dynamic = [n for n, v in values.items() if is_dynamic(v) or n in passthrough]
    static = {n: v for n, v in values.items() if n not in dynamic}
    return BlockSignature(params, dynamic, static, var_kw, frozenset(passthrough))


# --------------------------------------------------------------------------- the tracer


def _holds_proxy(index: Any) -> bool:
    """An index (``x[:, :n]``, ``x[i]``) that holds an fx proxy anywhere in it."""
    if isinstance(index, fx.Proxy):
        return True
    if isinstance(index, slice):
        return any(_holds_proxy(v) for v in (index.start, index.stop, index.step))
    if isinstance(index, (tuple, list)):
        return any(_holds_proxy(v) for v in index)
    return False


def _current_instruction(frame) -> tuple[list, int]:
    """The bytecode of ``frame`` and the index of the instruction it is executing."""
    instructions = list(dis.get_instructions(frame.f_code))
    offset = frame.f_lasti if sys.version_info >= (3, 11) else 2 * frame.f_lasti
    return instructions, bisect.bisect_left(instructions, offset, key=lambda i: i.offset)


def _in_assert(frame) -> bool:
    """``frame`` is testing the condition of an ``assert`` statement (the jump over
    ``raise AssertionError``)."""
    instructions, at = _current_instruction(frame)
    if at < len(instructions) and instructions[at].opname == "COMPARE_OP":
        at += 1  # Python 3.11 runs a comparison and the jump after it as one instruction
    jump = instructions[at].opname if at < len(instructions) else ""
    if not (jump.startswith("POP_JUMP") and "IF_TRUE" in jump) or at + 1 >= len(instructions):
        return False
    nxt = instructions[at + 1]
    return nxt.opname == "LOAD_ASSERTION_ERROR" or (nxt.opname == "LOAD_GLOBAL" and nxt.argval == "AssertionError")


def _holds_tensors(value: Any, seen: set) -> bool:
    """``value`` or anything it holds (containers, object attributes) is a tensor."""
    if isinstance(value, torch.Tensor):
        return True
    if id(value) in seen or isinstance(value, (nn.Module, type)) or callable(value) and not hasattr(value, "__dict__"):
        return False
    seen.add(id(value))
    if isinstance(value, dict):
        return any(_holds_tensors(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_tensors(v, seen) for v in value)
    return any(_holds_tensors(v, seen) for v in getattr(value, "__dict__", {}).values())


def _object_states(values: Any) -> list[tuple[Any, dict]]:
    """``(object, copy of its attributes)`` for each plain object among ``values`` (not a
    proxy, tensor, module or constant): a child's failed trace may change them."""
    out = []
    for v in tree_leaves(values):
        if hasattr(v, "__dict__") and not isinstance(v, (fx.Proxy, torch.Tensor, nn.Module, type)) and not is_static(v):
            try:
                out.append((v, dict(vars(copy_state(v)))))
            except CaptureError:
                continue
    return out


class _Remake:
    """Graph op that returns a fresh copy of an object as it was when the trace first handed
    it to a call (its state holds no tensors)."""

    def __init__(self, value: Any) -> None:
        self.value = copy_state(value)
        self.__name__ = f"remake_{type(value).__name__}"
        self.__qualname__ = self.__name__
        self.__module__ = __name__

    def __call__(self) -> Any:
        return copy_state(self.value)


class CustomFunctionError(TypeError):
    """Traced values reached a custom ``torch.autograd.Function``."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"it calls the custom autograd.Function {name} on the traced values, and its hand-written "
            "backward would not differentiate rewritten connections (a reversible layer stack's "
            "rebuilds each layer's inputs by subtracting its branches)"
        )


class ConcreteProxy(fx.Proxy):
    """A proxy that answers size-independent metadata (``dtype``, ``device``, ``dim()``)
    from the value its node had in the traced call, and iterates over a shape or a tuple
    (``(*x.shape[:-1], -1)``) by its concrete length, each item staying symbolic. A proxy
    of an object argument (a cache) passes ``isinstance`` checks as its value does."""

    def _concrete(self) -> Any:
        return self.tracer.values.get(self.node) if isinstance(self.tracer, BlockTracer) else None

    def __iter__(self):
        value = self._concrete()
        if isinstance(value, (tuple, list)):  # torch.Size too
            return iter([self[i] for i in range(len(value))])
        # unknown value: as fx does, read the length from the caller's ``a, b = proxy``
        instructions, at = _current_instruction(inspect.currentframe().f_back)
        if at < len(instructions) and instructions[at].opname == "UNPACK_SEQUENCE":
            return iter([self[i] for i in range(instructions[at].argval)])
        return self.tracer.iter(self)

    @property
    def __class__(self):  # noqa: D105 - read by ``isinstance`` when the proxy's own type does not match
        value = self._concrete()
        # an object argument (a cache) answers ``isinstance(cache, EncoderDecoderCache)`` as
        # its value does; the specialisation key holds its type (:func:`classify`)
        return type(value) if is_state_object(value) else type(self)

    def __bool__(self) -> bool:
        caller = inspect.currentframe().f_back
        # ``assert cond`` in the block's own code: a check, not a branch. In the code of a
        # child being inlined (Longformer's attention asserts on sizes) it stays an error,
        # so that the child is kept as one call, which runs its shape-dependent code as written.
        if _in_assert(caller) and not getattr(self.tracer, "inlining", 0):
            self.tracer.create_proxy("call_function", torch._assert, (self, "assertion in traced code"), {})
            return True
        return super().__bool__()

    def __getitem__(self, key: Any) -> Any:
        """An item of a value; ``None`` itself where the item was ``None`` in the traced call
        (a bias an opaque attention returns only in some layers), so that
        ``if bias is not None`` takes the branch the call took."""
        item = super().__getitem__(key)
        values = getattr(self.tracer, "values", {})
        if isinstance(item, fx.Proxy) and item.node in values and values[item.node] is None:
            values.pop(item.node)
            self.tracer.graph.erase_node(item.node)
            return None
        return item

    def __setitem__(self, key: Any, value: Any) -> None:
        """``x[1:] += y`` and ``x[mask] = v``: an in-place ``operator.setitem`` node."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        value = self._concrete()
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()

    def __getattr__(self, name: str) -> Any:
        value = self._concrete()
        if isinstance(value, torch.Tensor):
            if name in _CONCRETE_ATTRS:
                return getattr(value, name)
            if name in _CONCRETE_METHODS:
                return getattr(value, name)
        return super().__getattr__(name)


class BlockTracer(fx.Tracer):
    """Traces one block, inlining child modules where possible.

    Leaves: ``torch.nn`` layers, normalisation modules (:func:`~mhc_compile.heuristics.is_norm_module`),
    and any child whose own code cannot be traced (it is retried as an opaque
    call, so attention implementations with data-dependent Python stay modules).

    With ``sample`` (placeholder name -> value) every node is also run on concrete values
    as it is created, so :class:`ConcreteProxy` can answer metadata queries. While such a
    run is under way (``_concrete``), fx's patched module calls and attribute reads pass
    straight through, so the run records nothing.
    """

    def __init__(self, sample: Optional[dict] = None) -> None:
        super().__init__(autowrap_modules=(math,))
        self.forced_leaves: set[str] = set()
        self.sample = sample
        self.values: dict[fx.Node, Any] = {}
        self._concrete = False  # True while a node runs on concrete values
        self.opaque: dict[str, str] = {}  # child kept as one call -> why its code did not trace
        self.assignments = 0  # module attribute assignments made by the traced code so far
        self.inlining = 0  # child modules whose code is being traced into the block's graph now
        self._remade: dict[int, fx.Node] = {}  # id of an object made in the forward -> its node

    def trace(self, root, concrete_args=None):
        """fx's trace, refusing code that calls a custom ``torch.autograd.Function`` on traced
        values (:class:`CustomFunctionError`): tracing through its ``forward`` would drop its
        hand-written ``backward``. In a child, the child is kept as one call instead."""
        original = torch.autograd.Function.apply.__func__
        tracer = self

        def apply(cls, *args, **kwargs):
            if not tracer._concrete and any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
                raise CustomFunctionError(cls.__name__)
            return original(cls, *args, **kwargs)

        original_getitem = torch.Tensor.__getitem__

        def getitem(tensor, index):  # a real tensor sliced by a symbolic size: a graph op
            if not tracer._concrete and _holds_proxy(index):
                return tracer.create_proxy("call_function", operator.getitem, (tensor, index), {})
            return original_getitem(tensor, index)

        torch.autograd.Function.apply = classmethod(apply)
        torch.Tensor.__getitem__ = getitem
        try:
            with _random_factories_traced(self), _module_assignments_counted(self):
                return super().trace(root, concrete_args)
        finally:
            torch.autograd.Function.apply = classmethod(original)
            torch.Tensor.__getitem__ = original_getitem
    def create_arg(self, a: Any) -> Any:
        """fx's ``create_arg``; an object made inside the traced forward from no tensors (a
        cache built when none was passed) becomes a node that makes a fresh copy of it on
        every run, as the forward makes a new one on every call."""
        if isinstance(a, dict) and type(a) is not dict and dataclasses.is_dataclass(a):
            # a ModelOutput: rebuilt as itself (fx would make it a plain dict)
            return self.create_node("call_function", type(a), (), {k: self.create_arg(v) for k, v in a.items()})
        try:
            return super().create_arg(a)
        except NotImplementedError:
            if not hasattr(a, "__dict__") or _holds_tensors(a, set()):
                raise
        node = self._remade.get(id(a))
        if node is None:
            node = self.create_node("call_function", _Remake(a), (), {})
            self._remade[id(a)] = node
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.forced_leaves:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if type(m).__module__.startswith("torch.nn"):
            return True
        return is_norm_module(m)

    def call_module(self, m, forward, args, kwargs):
        if self._concrete:  # a child called by a concrete run: run it, record nothing
            return forward(*args, **kwargs)
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        before = list(self.graph.nodes)
        stack = self.module_stack.copy()
        state, assigned = module_state(m), self.assignments
        states = _object_states((args, kwargs))
        self.inlining += 1
        try:
            out = super().call_module(m, forward, args, kwargs)
            if self.assignments != assigned:
                raise _ModuleStateChanged(f"{type(m).__name__}'s forward assigns module attributes (state)")
            return out
        except Exception as err:  # noqa: BLE001 - fall back to an opaque call of this child
            restore_module_state(state)
            for obj, saved in states:  # undo what the failed attempt did to objects it was given
                obj.__dict__.clear()
                obj.__dict__.update(saved)
            where = _user_frame(err)
            self.opaque[qualname] = f"{type(err).__name__}{' at ' + where if where else ''}"
            logger.debug("trace: %s kept as an opaque call (%s: %s)", qualname, type(err).__name__, err)
            for node in reversed(list(self.graph.nodes)[len(before) :]):
                self.values.pop(node, None)
                self.graph.erase_node(node)
            self.module_stack = stack
            self.forced_leaves.add(qualname)
            return super().call_module(m, forward, args, kwargs)  # a leaf now: nothing is inlined
        finally:
            self.inlining -= 1

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._concrete:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.sample is not None:
            self._run_concrete(proxy.node)
        return proxy

    def _attribute(self, target: str) -> Any:
        """The root's attribute at the dotted path ``target`` (a parameter, a buffer)."""
        value = self.root
        for atom in str(target).split("."):
            value = getattr(value, atom)
        return value

    def _run_concrete(self, node: fx.Node) -> None:
        """Compute ``node``'s value from its inputs' values; leave it unknown on failure."""
        missing = object()

        def value_of(a: Any) -> Any:
            if isinstance(a, fx.Node) and a.op == "get_attr" and a not in self.values:
                try:  # a buffer used as an op's operand: its node was made without a proxy
                    self.values[a] = self._attribute(a.target)
                except AttributeError:
                    return missing
            return self.values.get(a, missing) if isinstance(a, fx.Node) else a

        args, kwargs = tree_map(value_of, node.args), tree_map(value_of, node.kwargs)
        if any(v is missing for v in tree_leaves((args, kwargs))):
            return
        self._concrete = True
        try:
            if node.op == "placeholder":
                value = self.sample.get(node.target, missing)
                if isinstance(value, torch.Tensor):
                    value = value.detach().clone()  # in-place ops of the block hit this copy
            elif node.op == "get_attr":
                value = self._attribute(node.target)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                value = self.root.get_submodule(node.target)(*args, **kwargs)
            else:
                return
        except Exception:  # noqa: BLE001 - metadata of this node stays symbolic
            return
        finally:
            self._concrete = False
        if value is not missing:
            self.values[node] = value


# --------------------------------------------------------------------------- tracing

class _ModuleStateChanged(RuntimeError):
    """A child's forward assigned module attributes: a graph would not repeat that."""


@contextlib.contextmanager
def _module_assignments_counted(tracer: BlockTracer):
    """While ``tracer`` traces, count ``module.attr = value`` assignments by the traced code
    (a recurrent state ``self.conv1d_state = ...``): a graph would not repeat them, so a
    child that makes one is kept as a call (:meth:`BlockTracer.call_module`)."""
    original = nn.Module.__setattr__

    def setattr_counted(module: nn.Module, name: str, value: Any) -> None:
        if not tracer._concrete:
            tracer.assignments += 1
        original(module, name, value)

    nn.Module.__setattr__ = setattr_counted
    try:
        yield
    finally:
        nn.Module.__setattr__ = original


# random tensors made from sizes only: traced as nodes, so that LayerDrop's
# ``if torch.rand([]) < p:`` is seen as a branch on a random value, not baked in as one draw
_RANDOM_FACTORIES = ("rand", "randn", "randint", "randperm")


@contextlib.contextmanager
def _random_factories_traced(tracer: BlockTracer):
    """While ``tracer`` traces, ``torch.rand`` & co. called without tensor arguments
    record a node instead of returning one fixed draw."""
    originals = {name: getattr(torch, name) for name in _RANDOM_FACTORIES}

    def traced(fn: Callable) -> Callable:
        def factory(*args: Any, **kwargs: Any) -> Any:
            if tracer._concrete:
                return fn(*args, **kwargs)
            return tracer.create_proxy("call_function", fn, args, kwargs)

        return factory

    for name, fn in originals.items():
        setattr(torch, name, traced(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)



def _user_frame(err: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch.fx and this package."""
    frames = traceback.extract_tb(err.__traceback__)
    skip = ("torch/fx", "mhc_compile", "<mhc trace root")
    for frame in reversed(frames):
        if not any(s in frame.filename.replace("\\", "/") for s in skip):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


def _untraceable(block: nn.Module, err: BaseException) -> CaptureError:
    """The CaptureError for a block whose own forward did not trace: the line, the cause and
    what to do."""
    where = _user_frame(err)
    at = f" at {where}" if where else ""
    first = first_line(err)
    name = type(block).__name__
    if isinstance(err, CustomFunctionError):
        return CaptureError(
            f"block {name} cannot be rewritten: torch.fx traced its forward{at}, where {first}; "
            "convert a variant of the model without the Function, or leave this block out with "
            "filter_fn= where the model has other blocks"
        )
    if isinstance(err, NotImplementedError) and first.startswith("argument of type"):
        return CaptureError(
            f"torch.fx could not trace the forward of {name}{at}: an object made inside the "
            f"forward ({first.split(':', 1)[-1].strip()}, e.g. a cache built when none was passed) "
            "is handed to a call the trace keeps, and a graph cannot hold such an object; pass it "
            "in as an argument where the forward takes one, or leave this block out with filter_fn="
        )
    return CaptureError(
        f"torch.fx could not trace the forward of {name}{at} ({type(err).__name__}: {first}); "
        "this block's own code (not its children) must be traceable to be rewritten: "
        "data-dependent Python (branching on tensor values) is the usual cause"
    )


def _trace_root_source(values: dict, signature: BlockSignature) -> str:
    """Source of ``_mhc_trace_root(self, <placeholders>)`` calling the forward with the
    constants of this specialisation filled in."""
    names = signature.dynamic
    positional_only = [p.name for p in signature.params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    call_parts = [name if name in names else f"_static[{name!r}]" for name in positional_only]
    for name in values:
        if name not in positional_only:
            call_parts.append(f"{name}={name}" if name in names else f"{name}=_static[{name!r}]")
    return (
        f"def _mhc_trace_root(self, {', '.join(names)}):\n"
        f"    return _orig(self, {', '.join(call_parts)})\n"
    )


def trace_block(
    block: nn.Module, values: dict, signature: BlockSignature, training: bool, shapes: bool = True
) -> fx.GraphModule:
    """Trace ``block`` for one specialisation; shapes are propagated from ``values``.

    The returned GraphModule's placeholders are ``signature.dynamic`` in order; its
    ``get_attr``/``call_module`` targets are paths relative to ``block``. fx traces a
    method of the root's class, so ``_mhc_trace_root`` is set on the class for the
    duration of the trace only.
    """
    names = signature.dynamic
    scope: dict[str, Any] = {"_orig": unwrapped_forward(block), "_static": signature.static}
    exec(compile(_trace_root_source(values, signature), f"<mhc trace root of {type(block).__name__}>", "exec"), scope)  # noqa: S102
    cls = type(block)
    was_training = block.training
    tracer = BlockTracer({n: copy_state(values[n]) for n in names})
    tracer.traced_func_name = "_mhc_trace_root"
    setattr(cls, "_mhc_trace_root", scope["_mhc_trace_root"])
    try:
        with side_effect_free(block):
            block.train(training)
            graph = tracer.trace(block)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise _untraceable(block, err) from err
    finally:
        delattr(cls, "_mhc_trace_root")
        block.train(was_training)
        tracer.values.clear()
    gm = fx.GraphModule(block, graph)
    gm.meta["mhc_opaque"] = dict(tracer.opaque)
    if not shapes:
        return gm
    with side_effect_free(block):
        block.train(training)
        try:
            ShapeProp(gm).propagate(*[copy_state(values[n]) for n in names])
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise CaptureError(
                f"running the traced forward of {type(block).__name__} on its recorded "
                f"arguments failed ({type(err).__name__}: {first_line(err)}); "
                "the block's graph depends on something its arguments do not carry"
            ) from err
        finally:
            block.train(was_training)
    return gm


# --------------------------------------------------------------------------- passthrough


def _graph_shape(graph: fx.Graph, probes: Optional[dict] = None) -> list:
    """Nodes as comparable tuples; placeholders named in ``probes`` read as their values."""
    probes = probes or {}
    # nodes by position, not name: a child whose trace failed and was erased leaves gaps in
    # the name counters that differ from one trace to the next
    position = {n: i for i, n in enumerate(n for n in graph.nodes if n.op != "placeholder")}

    def norm(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.op == "placeholder":
                return ("const", repr(probes[a.target])) if a.target in probes else ("arg", a.target)
            return ("node", position[a])
        if isinstance(a, (tuple, list)):
            return tuple(norm(b) for b in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return ("const", repr(a))

    return [
        (n.op, str(n.target), norm(n.args), norm(n.kwargs)) for n in graph.nodes if n.op != "placeholder"
    ]


def find_passthrough(
    block: nn.Module, values: dict, signature: BlockSignature, training: bool, candidates: Optional[frozenset] = None
) -> frozenset:
    """Constant or ``None`` arguments (of ``candidates``, by default all) whose value does not
    change the traced graph.

    An attention mask that the block only hands to its attention module is such an
    argument: tracing it as a placeholder gives the same graph with the value swapped for
    a placeholder. Those arguments are not specialised, so a caller that passes a tensor
    where the sample call passed ``None`` (as Hugging Face models do under
    ``torch.compile``) reuses the same graph. ``candidates`` limits the names tried
    (default: every constant of ``signature``).
    """
    tried = [name for name in signature.static if candidates is None or name in candidates]
    if not tried:
        return frozenset()
    base = _graph_shape(trace_block(block, values, signature, training, shapes=False).graph)

    def same_graph(names: list[str]) -> bool:
        probe = split_signature(values, signature.params, signature.var_keyword, frozenset(names))
        try:
            gm = trace_block(block, values, probe, training, shapes=False)
        except CaptureError:
            return False
        return _graph_shape(gm.graph, {n: values[n] for n in names}) == base

    found = [name for name in tried if same_graph([name])]
    return frozenset(found) if found and same_graph(found) else frozenset()

