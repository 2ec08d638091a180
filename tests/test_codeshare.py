"""Equal blocks share their generated code, so regional compilation compiles them once."""

import torch
from torch._dynamo.utils import counters

import mhc_compile as mhc
from mhc_compile.codeshare import shared_function
from tiny_hf import llama, token_ids


def _generated(source: str, scope: dict):
    exec(compile(source, "<generated>", "exec"), scope)  # noqa: S102 - as the runtime generates code
    return scope["f"]


def test_equal_code_and_globals_share_one_function_and_other_globals_do_not():
    source = "def f(x, y=_defaults['y']):\n    return g(x) + y\n"
    defaults = {"y": 1.5}
    first = shared_function(_generated(source, {"g": abs, "_defaults": defaults}))
    again = shared_function(_generated(source, {"g": abs, "_defaults": dict(defaults)}))
    other = shared_function(_generated(source, {"g": round, "_defaults": defaults}))
    assert again is first
    assert other is not first and other(-2.4) == round(-2.4) + 1.5


def test_converted_layers_compile_once_for_the_whole_stack():
    torch._dynamo.reset()
    ids = token_ids(batch=2, length=12)
    reference = mhc.mhc_compile(llama(layers=4, seed=3), n_streams=4, init="paper")
    expected = reference(input_ids=ids, labels=ids, use_cache=False).loss
    graphs = []
    for _ in range(2):  # a second model of the same architecture reuses the first one's graphs
        model = mhc.mhc_compile(llama(layers=4, seed=3), n_streams=4, init="paper")
        for layer in model.model.layers:
            layer.compile(backend="eager")
        before = counters["stats"]["unique_graphs"]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"] - before)
        assert torch.isfinite(loss) and abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    # first layer (one stream in), middle layers (one graph for all), last layer (collapse)
    assert graphs[0] <= 3, graphs
    assert graphs[1] == 0, graphs
