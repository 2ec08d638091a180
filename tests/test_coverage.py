"""The mechanisms behind "any model": one test per failure class that stopped conversions
(tiny Hugging Face configs and hand-written idioms, CPU). Each test converts the way a user
would and checks the outputs against the unconverted model."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import mhc_compile as mhc
from mhc_compile.passes.find_residuals import find_residual_adds
from idioms import PositionTable
from models import BY_NAME

transformers = pytest.importorskip("transformers")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _convert_and_compare(model: nn.Module, inputs: dict, out=lambda o: o.logits, **options) -> nn.Module:
    """Convert ``model`` (HF inputs synthesised) and check it equals the original on ``inputs``."""
    model.eval()
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, **options)
    with torch.no_grad():
        assert _rel_err(out(model(**inputs)), out(original(**inputs))) <= 1e-5
    return original


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.forward


def _assert_untouched(model, snap):
    state, forward = snap
    assert set(model.state_dict()) == set(state)
    assert not mhc.is_converted(model)
    assert "forward" not in vars(model) and not any("forward" in vars(m) for m in model.modules())
    assert not any(hasattr(m, "mhc") for m in model.modules())


# ---------------------------------------------------------------- 1. broadcasting adds


def test_broadcasting_adds_are_not_connections():
    class MaskedScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.f = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, mask):  # x [B, T, C]; mask [B, 1, T]
            scores = self.q(x) @ x.transpose(1, 2)  # [B, T, T]
            scores = scores + mask  # broadcasting: never a connection
            return x + self.f(scores.softmax(-1) @ x)

    x, mask = torch.randn(2, 5, 8), torch.randn(2, 1, 5)
    ep = torch.export.export(MaskedScores(), (x, mask), strict=False)
    params = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "PARAMETER"}
    found, cuts = find_residual_adds(ep.graph, lambda n: n.op == "placeholder" and n.name in params)
    assert len(found) == 1 and not cuts
    model = MaskedScores()
    ref = model(x, mask)
    mhc.mhc_compile(model, example_inputs=(x, mask))
    assert len(mhc.inspect(model, print_table=False)) == 1
    assert _rel_err(model(x, mask), ref) <= 1e-5


# ---------------------------------------------------------------- 2. per-layer arguments and caches


@pytest.mark.parametrize("name", ["llama", "gemma2", "falcon"])
def test_generate_with_cache_equals_original(name):
    """A cache is state: each block is traced with its own call and a copy of the cache,
    so greedy generation (prefill + decode steps with a growing cache) is unchanged."""
    entry = BY_NAME[name]
    model = entry.build().eval()
    original = copy.deepcopy(model)
    mhc.mhc_compile(model)
    ids = torch.randint(3, 97, (1, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), original.generate(ids, **kwargs))
    with torch.no_grad():  # the default forward (use_cache=True) matches as well
        assert _rel_err(model(ids).logits, original(ids).logits) <= 1e-5


def test_encoder_decoder_cache_branches_and_masks_per_specialisation():
    """PegasusX's eager attention traces inline and branches on
    ``isinstance(cache, EncoderDecoderCache)``; the cross-attention mask passes through the
    layer when a cache is given (that child stays one call) but is read inline without one."""
    cfg = transformers.PegasusXConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, num_global_tokens=4, block_size=4, max_position_embeddings=64,
                                      decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.PegasusXForConditionalGeneration(cfg)
    inputs = {"input_ids": torch.randint(3, 97, (2, 8)), "decoder_input_ids": torch.randint(3, 97, (2, 5))}
    original = _convert_and_compare(model, inputs)  # the sample call holds an EncoderDecoderCache
    with torch.no_grad():
        assert _rel_err(model(**inputs, use_cache=False).logits, original(**inputs, use_cache=False).logits) <= 1e-5
    kwargs = dict(max_new_tokens=3, do_sample=False)
    ids = inputs["input_ids"][:1]
    assert torch.equal(model.generate(ids, **kwargs), original.generate(ids, **kwargs))


class _PadBranch(nn.Module):
    """FSMT/LED style: the model (not a block) branches on tensor values, ``if mask.any():``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList([_Residual(8), _Residual(8)])

    def forward(self, ids):
        pad = ids.eq(0)
        if not pad.any():
            pad = None
        x = self.emb(ids)
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        for block in self.blocks:
            x = block(x)
        return x


class _Residual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.f(x)


def test_data_dependent_branch_outside_the_blocks_is_analysed(capfd):
    model = _PadBranch()
    ids = torch.randint(1, 11, (2, 5))
    padded = ids.clone()
    padded[0, 0] = 0
    refs = [model(ids), model(padded)]
    mhc.mhc_compile(model, example_inputs=ids)
    assert len(mhc.inspect(model, print_table=False)) == 2
    assert "def forward" not in capfd.readouterr().err  # torch's partial graph is not printed
    with torch.no_grad():
        assert max(_rel_err(model(x), r) for x, r in zip((ids, padded), refs)) <= 1e-5


class _TwoStreams(nn.Module):
    """PegasusX's encoder layer: local and global tokens, each with its own residual add."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f, self.g = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, glob):
        return x + self.f(x + glob.mean(1, keepdim=True)), glob + self.g(glob)


class _UnusedResults(nn.Module):
    """The last layer's global stream and a pooling head (SigLIP's) feed no output."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([_TwoStreams(dim), _TwoStreams(dim)])
        self.head = _Residual(dim)

    def forward(self, x, glob):
        for layer in self.layers:
            x, glob = layer(x, glob)
        self.head(x)  # computed, never used
        return x


def test_residual_adds_whose_result_reaches_no_output_stay_plain():
    model = _UnusedResults()
    x, glob = torch.randn(2, 5, 8), torch.randn(2, 2, 8)
    ref = model(x, glob)
    mhc.mhc_compile(model, example_inputs=(x, glob))
    assert [r["block"] for r in mhc.inspect(model, print_table=False)] == ["layers.0", "layers.0", "layers.1"]
    assert any("layers.1: add" in c and "reaches no output" in c for c in model._mhc_analysis.cuts)
    assert _rel_err(model(x, glob), ref) <= 1e-5
    model(x, glob).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mhc.mhc_parameters(model))


def test_multi_branch_blocks_without_identity_are_refused_with_the_reason():
    """TextNet/RepVGG: ``bn(conv(x)) + bn(x)``: two trained branches, no identity skip."""

    class RepBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.bn_id = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + self.bn_id(x))

    model = nn.Sequential(RepBlock(), RepBlock()).eval()
    snap = _snapshot(model)
    with pytest.raises(mhc.NoResidualError, match=r"2 adds sum two trained branches of one input.*'0', '1'"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 4, 6, 6))
    _assert_untouched(model, snap)


def test_encoder_with_layerdrop_falls_back_to_its_layers():
    """HuBERT's encoder owns an add (positional convolution) and drops layers at random in
    training (``if torch.rand([]) < layerdrop``): that draw is not baked into a graph; the
    encoder stays as written and its layers are converted."""
    cfg = transformers.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    conv_dim=(16, 16), conv_stride=(4, 4), conv_kernel=(8, 4),
                                    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, layerdrop=0.5)
    torch.manual_seed(0)
    model = transformers.HubertModel(cfg)
    inputs = {"input_values": torch.randn(2, 800)}
    _convert_and_compare(model, inputs, lambda o: o.last_hidden_state)
    blocks = [r["block"] for r in mhc.inspect(model, print_table=False)]
    assert blocks and all(b.startswith("encoder.layers.") for b in blocks)
    assert any(c.startswith("encoder: its own residual adds are not rewritten") for c in model._mhc_analysis.cuts)
    model.train()
    torch.manual_seed(1)
    model(**inputs).last_hidden_state.pow(2).mean().backward()  # LayerDrop draws anew per call


def test_block_returning_a_model_output_returns_one():
    from transformers.modeling_outputs import BaseModelOutput

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return BaseModelOutput(last_hidden_state=x + self.f(x))

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return x

    model, x = Root(), torch.randn(2, 5, 8)
    ref = model(x)
    mhc.mhc_compile(model, example_inputs=x)
    assert isinstance(model.layers[0](x), BaseModelOutput)
    assert _rel_err(model(x), ref) <= 1e-5


def test_block_output_the_parent_also_reads_is_not_linked():
    """BridgeTower: the parent hands a block's output to the next block *and* reads it
    itself (``head(x.type(dtype))``, a no-op cast that returns the same tensor)."""

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.third = _Residual(8), _Residual(8), _Residual(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.first(x)
            if x.dtype == torch.float16 or x.shape[-1] != 8:  # metadata reads: still linked
                raise TypeError
            x = self.second(x)
            side = self.head(x.type(x.dtype).permute(1, 0, 2))
            return self.third(x), side

    model, x = Root(), torch.randn(2, 5, 8)
    refs = model(x)
    mhc.mhc_compile(model, example_inputs=x)
    assert [b.chain for b in model._mhc_analysis.blocks] == [0, 0, 1]
    assert any("chain cut before third: the parent also reads second's output" in c for c in model._mhc_analysis.cuts)
    assert max(_rel_err(a, b) for a, b in zip(model(x), refs)) <= 1e-5


def test_child_that_keeps_state_on_the_module_stays_a_call():
    """RecurrentGemma's temporal block keeps its state on the module (``self.conv1d_state =
    ...``, reset when ``use_cache=False``): a graph would not repeat the assignment, so that
    child runs as written; tracing leaves the module's attributes as they were."""
    cfg = transformers.RecurrentGemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, lru_width=32,
                                            attention_window_size=16, block_types=["recurrent", "attention"])
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(cfg)
    original = _convert_and_compare(model, {"input_ids": torch.randint(3, 97, (2, 7))})
    ids = torch.randint(3, 97, (3, 9))  # another batch size: no state of the sample's left behind
    with torch.no_grad():
        assert _rel_err(model(ids, use_cache=False).logits, original(ids, use_cache=False).logits) <= 1e-5


# ---------------------------------------------------------------- 3. tensor metadata while tracing


class _ClampsHalf(nn.Module):
    """Whisper/BART style: Python branching on the dtype and unpacking a shape."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, _ = x.shape
        y = self.f(x).reshape(batch, length, -1)
        if y.dtype == torch.float16:
            y = y.clamp(-1000, 1000)
        return x + y


def test_dtype_branches_trace_and_respecialise():
    model = nn.Sequential(_ClampsHalf(), _ClampsHalf())
    x = torch.randn(2, 5, 8)
    ref = model(x)
    mhc.mhc_compile(model, example_inputs=x)
    assert len(mhc.inspect(model, print_table=False)) == 2
    assert _rel_err(model(x), ref) <= 1e-5
    model.double()  # a new dtype: a new graph, traced on first use
    assert _rel_err(model(x.double()), ref.double()) <= 1e-5


def test_untraceable_block_error_names_the_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            width = int(x.shape[-1])  # a Python int from a size: export specialises, torch.fx cannot
            return x + self.f(x) * (width / 8)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block = nn.Linear(4, 8), Branchy()

        def forward(self, x):
            return self.block(self.inp(x))

    model = Root()
    snap = _snapshot(model)
    with pytest.raises(mhc.CaptureError, match=r"could not trace the forward of Branchy at .*test_coverage.py:\d+: width = int"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 4))
    _assert_untouched(model, snap)


# ---------------------------------------------------------------- 4. ops on the skip, scaled branches


class _Idiom(nn.Module):
    def __init__(self, kind: str, dim: int = 8):
        super().__init__()
        self.kind, self.f = kind, nn.Linear(dim, dim)

    def forward(self, x):
        if self.kind == "cast":
            return x.to(torch.float32) + self.f(x)
        if self.kind == "contiguous":
            return x.contiguous() + self.f(x)
        if self.kind == "alpha":
            return torch.add(x, self.f(x), alpha=0.5)
        if self.kind == "sub":
            return x - self.f(x)
        return x + self.f(x)


def _assert_chain_of_three_converts(block: type, kind: str) -> None:
    """Three ``block(kind)`` in a row convert to one linked chain, equal at init at two
    shapes, and every mHC parameter gets a finite gradient."""
    model = nn.Sequential(nn.Linear(4, 8), *[block(kind) for _ in range(3)], nn.Linear(8, 3))
    x = torch.randn(2, 5, 4)
    ref = model(x)
    mhc.mhc_compile(model, example_inputs=x)
    rows = mhc.inspect(model, print_table=False)
    assert len(rows) == 3 and {r["chain"] for r in rows} == {0}  # one linked chain
    assert _rel_err(model(x), ref) <= 1e-5
    assert _rel_err(model(x[:1, :3]), ref[:1, :3]) <= 1e-5
    model.train()
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mhc.mhc_parameters(model))


@pytest.mark.parametrize("kind", ["cast", "contiguous", "alpha", "sub"])
def test_ops_on_the_skip_and_scaled_branches_are_connections(kind):
    _assert_chain_of_three_converts(_Idiom, kind)


class _ScaledSkip(nn.Module):
    """The skip scaled or shifted by values computed without it (MiniMax, Beam, Doge, Zaya)."""

    def __init__(self, kind: str, dim: int = 8):
        super().__init__()
        self.kind, self.f = kind, nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.shift = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        if self.kind == "alpha":
            return torch.add(self.f(x), x, alpha=0.5)
        if self.kind == "constants":
            return x * 0.75 + self.f(x) * 1.5
        if self.kind == "per_channel":
            return self.scale * x + self.f(x)
        if self.kind == "affine":
            return self.f(x) + ((x + self.shift) * self.scale).to(torch.float32)
        return self.f(x) - x


@pytest.mark.parametrize("kind", ["alpha", "constants", "per_channel", "affine", "negated"])
def test_scaled_skip_is_a_connection(kind):
    _assert_chain_of_three_converts(_ScaledSkip, kind)


def test_gated_skip_is_not_a_connection():
    class Highway(nn.Module):  # the skip's scale is computed from the skip itself
        def __init__(self):
            super().__init__()
            self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.sigmoid(self.g(x)) * x + self.f(x)

    with pytest.raises(mhc.NoResidualError):
        mhc.mhc_compile(Highway(), example_inputs=torch.randn(2, 8))


# ---------------------------------------------------------------- 5. analysis and trace agree


@pytest.mark.parametrize("family", ["phi", "roberta_prelayernorm"])
def test_parallel_residual_and_norm_named_containers(family):
    if family == "phi":
        cfg = transformers.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=97)
        model, out = transformers.PhiForCausalLM(cfg), (lambda o: o.logits)
    else:
        cfg = transformers.RobertaPreLayerNormConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=97)
        model, out = transformers.RobertaPreLayerNormModel(cfg), (lambda o: o.last_hidden_state)
    inputs = {"input_ids": torch.randint(3, 97, (2, 7))}
    _convert_and_compare(model, inputs, out)
    assert len(mhc.inspect(model, print_table=False)) == (2 if family == "phi" else 4)


def test_unpacking_an_opaque_attention_call_traces():
    """GPT-Neo: ``attn_output, attn_weights = self.attn(...)`` where ``attn`` stays one call."""
    cfg = transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=97,
                                    attention_types=[[["global", "local"], 1]], max_position_embeddings=64)
    model = transformers.GPTNeoForCausalLM(cfg)
    _convert_and_compare(model, {"input_ids": torch.randint(3, 97, (2, 7))})
    assert len(mhc.inspect(model, print_table=False)) == 4


def test_adds_across_a_module_list_belong_to_its_parent():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x):
            return x + self.layers[1](torch.relu(self.layers[0](x)))

    model = nn.Sequential(nn.Linear(4, 8), Pair(), Pair())
    x = torch.randn(3, 4)
    ref = model(x)
    mhc.mhc_compile(model, example_inputs=x)
    assert {r["block"] for r in mhc.inspect(model, print_table=False)} == {"1", "2"}
    assert _rel_err(model(x), ref) <= 1e-5


def test_a_bias_shared_by_every_layer_is_no_connection(capsys):
    class BiasedLayer(nn.Module):  # CPM-Ant's idiom: every layer adds one shared bias to its scores
        def __init__(self):
            super().__init__()
            self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, bias):
            return x + self.f(torch.tanh(self.g(x) + bias))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([BiasedLayer() for _ in range(3)])

        def forward(self, x, bias):  # from layer 1 on, ``bias`` is an ancestor of the scores
            for layer in self.layers:
                x = layer(x, bias)
            return x

    model = Stack()
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=(torch.randn(2, 5, 8), torch.randn(2, 5, 8)))
    rows = mhc.inspect(model, print_table=False)
    assert [(r["block"], r["chain"]) for r in rows] == [("layers.0", 0), ("layers.1", 0), ("layers.2", 0)]
    x, bias = torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    assert _rel_err(model(x, bias), original(x, bias)) <= 1e-5


class _Routed(nn.Module):
    """A mixture of experts that loops over the experts the input routes to (Python that
    branches on tensor values: torch.export cannot capture it)."""

    def __init__(self, dim: int = 8, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList([nn.Linear(dim, dim) for _ in range(experts)])

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e in choice.unique().tolist():
            hit = choice == e
            out = out.masked_scatter(hit[..., None], self.experts[e](x[hit]))
        return out


class _MoEBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.norm, self.moe = nn.LayerNorm(dim), _Routed(dim)

    def forward(self, x):
        return x + self.moe(self.norm(x))


def test_data_dependent_experts_are_analysed_on_the_sample():
    model = nn.Sequential(nn.Linear(4, 8), _MoEBlock(), _MoEBlock(), nn.Linear(8, 3))
    x = torch.randn(2, 6, 4)
    with pytest.raises(Exception, match="(?i)data.dependent"):
        torch.export.export(model, (x,), strict=False)
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=x)
    assert [(r["block"], r["chain"]) for r in mhc.inspect(model, print_table=False)] == [("1", 0), ("2", 0)]
    y = torch.randn(3, 5, 4)
    assert _rel_err(model(y), original(y)) <= 1e-5
    model(y).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mhc.mhc_parameters(model))


# ---------------------------------------------------------------- 6. every chain cut has a reason


def test_block_argument_named_input_links():
    class Block(nn.Module):  # torchvision's ViT/ConvNeXt blocks name their argument ``input``
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, input):  # noqa: A002 - the idiom under test
            return input + self.f(input)

    model = nn.Sequential(nn.Linear(4, 8), Block(), Block(), Block())
    x = torch.randn(2, 4)
    mhc.mhc_compile(model, example_inputs=x)
    assert [r["chain"] for r in mhc.inspect(model, print_table=False)] == [0, 0, 0]


def test_chain_cuts_are_listed_with_reasons(capsys):
    model = BY_NAME["resnet"].build()
    mhc.mhc_compile(model)
    mhc.inspect(model)
    printed = capsys.readouterr().out
    assert "chain cut before encoder.stages.1.layers.1" in printed and "another shape" in printed
    assert "projection shortcut" in printed


def test_parent_reading_a_block_output_cuts_the_chain_there(capsys):
    class Memory(nn.Module):  # XLNet's idiom: the parent keeps a slice of each layer's input
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_Idiom("plain") for _ in range(4)])

        def forward(self, x):
            mems = []
            for i, block in enumerate(self.blocks):
                if i == 2:
                    mems.append(x[:, -2:].detach())
                x = block(x)
            return x, torch.stack(mems)

    model = Memory()
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=torch.randn(2, 5, 8))
    assert [r["chain"] for r in mhc.inspect(model, print_table=False)] == [0, 0, 1, 1]
    mhc.inspect(model)
    assert "chain cut before blocks.2: the parent also reads blocks.1's output" in capsys.readouterr().out
    x = torch.randn(3, 7, 8)
    for new, old in zip(model(x), original(x)):
        assert new.shape == old.shape and _rel_err(new, old) <= 1e-5


# ---------------------------------------------------------------- 7. synthesised inputs


def test_default_inputs_for_t5_and_clip():
    t5 = BY_NAME["t5"].build()
    inputs = BY_NAME["t5"].inputs(2, 7)
    _convert_and_compare(t5, inputs)  # input_ids + decoder_input_ids synthesised
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8)))
    inputs = {"input_ids": torch.randint(3, 97, (2, 6)), "pixel_values": torch.randn(2, 3, 16, 16)}
    _convert_and_compare(clip, inputs, lambda o: o.logits_per_image)
    assert len(mhc.inspect(clip, print_table=False)) == 8


# ---------------------------------------------------------------- 8. the channel axis from structure


def test_cvt_channel_axis_follows_the_layers_not_the_sizes():
    """Stage 0 at 16x16 pixels has 4x4 = 16 tokens of width 16: both axes fit the sizes;
    the branch ends in a Linear, so the channels are last. Other sizes and train mode run."""
    cfg = transformers.CvtConfig(embed_dim=[16, 24, 32], num_heads=[1, 1, 2], depth=[1, 2, 3], num_labels=5)
    model = transformers.CvtForImageClassification(cfg)
    pixels = torch.randn(2, 3, 16, 16)
    original = _convert_and_compare(model, {"pixel_values": pixels}, example_inputs={"pixel_values": pixels})
    assert {r["layout"] for r in mhc.inspect(model, print_table=False)} == {"[..., n, C]"}
    with torch.no_grad():
        other = torch.randn(3, 3, 24, 24)
        assert _rel_err(model(pixel_values=other).logits, original(pixel_values=other).logits) <= 1e-5
    model.train()
    original.train()
    torch.manual_seed(1)
    a = model(pixel_values=other).logits  # drop-path's per-sample mask scales every stream alike
    torch.manual_seed(1)
    b = original(pixel_values=other).logits
    assert _rel_err(a, b) <= 1e-5


def test_wrong_layout_is_caught_before_returning():
    """A channel axis that does not fit fails the conversion's own output check; the model
    is left as it was."""
    model = BY_NAME["llama"].build()
    snap = _snapshot(model)
    with pytest.raises(mhc.ConversionError):
        mhc.mhc_compile(model, channel_dim=1)
    _assert_untouched(model, snap)


# ---------------------------------------------------------------- 9. weight-shared blocks


def test_weight_shared_albert_converts_with_shared_connections():
    cfg = transformers.AlbertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                    embedding_size=16, vocab_size=97)
    model = transformers.AlbertModel(cfg)
    inputs = {"input_ids": torch.randint(3, 97, (2, 7))}
    _convert_and_compare(model, inputs, lambda o: o.last_hidden_state)
    analysis = model._mhc_analysis
    assert analysis.blocks[0].calls == 3  # one layer applied three times, one set of mHC parameters
    assert any("called 3 times" in c or "are not rewritten" in c for c in analysis.cuts)
    model.train()
    model(**inputs).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None for p in mhc.mhc_parameters(model))


# ---------------------------------------------------------------- 10. models with their own hyper-connections


def test_model_with_own_hyper_connections_is_refused():
    class ToyHyperConnection(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.w(x)

    model = nn.Sequential(nn.Linear(4, 8), ToyHyperConnection())
    snap = _snapshot(model)
    with pytest.raises(mhc.ConversionError, match="already carries hyper-connections"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 4))
    _assert_untouched(model, snap)


# ---------------------------------------------------------------- the block runtime: pickle, deepcopy, save


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_converted_model_pickles_and_copies(how):
    entry = BY_NAME["llama"]
    model = entry.build().eval()
    mhc.mhc_compile(model)
    with torch.no_grad():
        for p in mhc.mhc_parameters(model):
            p.add_(0.01 * torch.randn_like(p))  # trained-looking mHC parameters
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    inputs = entry.inputs(2, 9)
    with torch.no_grad():
        assert torch.equal(copied(**inputs).logits, model(**inputs).logits)
    assert mhc.is_converted(copied)
    layer = copied.model.layers[0]
    assert layer.forward.block is layer  # the copy's forward drives the copy, not the original
    copied.train()
    copied(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in mhc.mhc_parameters(copied))


# ---------------------------------------------------------------- value-free ops, skips across blocks, passthrough


def test_zeros_like_of_the_stream_carries_no_values():
    """GIT: ``token_type_ids = zeros_like(embeddings)`` embedded and added to the stream is no
    residual add of the whole model; the layers are the blocks."""

    class TypeIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.types = nn.Embedding(11, 8), nn.Embedding(2, 8)
            self.layers = nn.ModuleList([_Idiom("plain"), _Idiom("plain")])

        def forward(self, ids):
            h = self.emb(ids)
            h = h + self.types(torch.zeros_like(h, dtype=torch.long)[..., 0])
            for layer in self.layers:
                h = layer(h)
            return h

    model, ids = TypeIds(), torch.randint(0, 11, (2, 5))
    ref = model(ids)
    mhc.mhc_compile(model, example_inputs=ids)
    assert [(r["block"], r["chain"]) for r in mhc.inspect(model, print_table=False)] == [("layers.0", 0), ("layers.1", 0)]
    assert _rel_err(model(ids), ref) <= 1e-5


class _CastsBack(nn.Module):
    """Inkling-style: the residual is kept in float32 and the output cast back to the input's
    dtype, so the next block's skip is a cast of the previous block's cast."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x):
        dtype, y = x.dtype, self.f(x)
        return (x.float() + y).to(dtype)


def test_skip_cast_of_the_previous_blocks_output_belongs_to_this_block():
    model = nn.Sequential(nn.Linear(4, 8), _CastsBack(), _CastsBack(), _CastsBack())
    x = torch.randn(2, 5, 4)
    ref = model(x)
    mhc.mhc_compile(model, example_inputs=x)
    rows = mhc.inspect(model, print_table=False)
    assert [r["block"] for r in rows] == ["1", "2", "3"] and {r["chain"] for r in rows} == {0}
    assert _rel_err(model(x), ref) <= 1e-5


class _State:
    """A cache-like object: a block given one cannot be traced through its child."""

    def __init__(self):
        self.seen = 0


class _MaskedMix(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.g = nn.Linear(dim, dim)

    def forward(self, x, mask=None, state=None):
        if state is not None:
            state.seen = int(x.shape[1])  # a size as a Python int: this child stays one call
        if mask is not None:
            x = x * mask[..., None]
        return self.g(x)


class _MaskedBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.f, self.mix = nn.Linear(dim, dim), _MaskedMix(dim)

    def forward(self, x, mask=None, state=None):
        return x + self.mix(self.f(x), mask, state)


class _MaskedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_MaskedBlock(), _MaskedBlock()])

    def forward(self, x, mask=None, stateful=False):
        state = _State() if stateful else None
        for block in self.blocks:
            x = block(x, mask, state)
        return x


def test_passthrough_argument_is_checked_again_for_other_calls():
    """``mask=None`` only reaches a child that is one opaque call in the sample call (a state
    object is given), so it is left unspecialised; without the state object the child is
    inlined and branches on the mask: that call gets its own graph, and so does a mask."""
    model, x = _MaskedModel(), torch.randn(2, 5, 8)
    mask = (torch.rand(2, 5) > 0.3).float()
    refs = [model(x, stateful=True), model(x), model(x, mask)]
    mhc.mhc_compile(model, example_inputs=((x,), {"stateful": True}))
    assert len(mhc.inspect(model, print_table=False)) == 2
    assert model.blocks[0]._mhc_plan.analysis.signature.passthrough == frozenset({"mask"})
    with torch.no_grad():
        for got, ref in zip([model(x, stateful=True), model(x), model(x, mask)], refs):
            assert _rel_err(got, ref) <= 1e-5


class _MaskedAttention(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, mask):  # mask: [B, T, T], the scores' own shape
        scores = self.q(x) @ x.transpose(1, 2) + mask
        return x + self.o(scores.softmax(-1) @ x)


def test_mask_made_from_token_ids_is_no_skip():
    """ProphetNet: an additive mask of the scores' full shape, made from the padding mask,
    reaches the next layer's scores through this one's; it carries no stream values, so
    ``scores + mask`` is no connection and the layers stay the blocks."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.layers = nn.ModuleList([_MaskedAttention(), _MaskedAttention()])

        def forward(self, ids, attention_mask):
            x = self.emb(ids)
            length = ids.shape[1]
            mask = (1.0 - attention_mask[:, None, :].float()).expand(-1, length, -1) * -1e4
            for layer in self.layers:
                x = layer(x, mask)
            return x

    model, ids = Model(), torch.randint(0, 11, (2, 6))
    pad = torch.ones(2, 6, dtype=torch.long)
    pad[1, 4:] = 0
    ref = model(ids, pad)
    mhc.mhc_compile(model, example_inputs=(ids, pad))
    assert [r["block"] for r in mhc.inspect(model, print_table=False)] == ["layers.0", "layers.1"]
    assert _rel_err(model(ids, pad), ref) <= 1e-5


# ---------------------------------------------------------------- block code the per-block trace follows


class _BufferScaled(nn.Module):
    """Gemma3n's AltUp: a branch scaled by a buffer, then reshaped by its own leading sizes."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x):
        h = self.f(x) * self.scale
        return x + h.reshape(*h.shape[:-1], 2, -1).flatten(-2)


class _ShiftAdds(nn.Module):
    """Gemma3n: ``y[1:] += first`` on a computed value (item assignment while tracing)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f, self.g = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        y = self.f(x)
        y[:, 1:] += self.g(x)[:, :-1]
        return x + y


@pytest.mark.parametrize("block", [_BufferScaled, _ShiftAdds])
def test_buffer_operands_and_item_assignment_trace(block):
    model = nn.Sequential(nn.Linear(4, 8), block(), block())
    original = copy.deepcopy(model)
    x = torch.randn(2, 5, 4)
    mhc.mhc_compile(model, example_inputs=x)
    assert [r["chain"] for r in mhc.inspect(model, print_table=False)] == [0, 0]
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 7, 4)):  # one graph for every batch size and length
            assert _rel_err(model(inputs), original(inputs)) <= 1e-5
    model.train()
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mhc.mhc_parameters(model))


class _OpaqueWithBias(nn.Module):
    """An attention-like child that torch.fx cannot trace (it branches on a size); it
    returns a bias only when it has one (GPT-NeoX-Japanese: only the last layer's)."""

    def __init__(self, dim: int = 8, bias: bool = False):
        super().__init__()
        self.f = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.randn(dim)) if bias else None

    def forward(self, x):
        y = self.f(x)
        if int(x.shape[-1]) > 10**6:  # a size as a Python int: this child stays one call
            y = y / 2
        return y, self.bias


class _AddsOptionalBias(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.attn = _OpaqueWithBias(bias=bias)

    def forward(self, x):
        y, bias = self.attn(x)
        return x + (y + bias.expand_as(x) if bias is not None else y)


def test_none_returned_by_an_opaque_child_stays_none():
    model = nn.Sequential(nn.Linear(4, 8), _AddsOptionalBias(False), _AddsOptionalBias(True))
    original = copy.deepcopy(model)
    x = torch.randn(2, 5, 4)
    mhc.mhc_compile(model, example_inputs=x)
    assert len(mhc.inspect(model, print_table=False)) == 2
    with torch.no_grad():
        assert _rel_err(model(x), original(x)) <= 1e-5


class _RoundStraightThrough(torch.autograd.Function):
    """Rounds in forward, passes the gradient straight through in backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Rounded(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x):
        return _RoundStraightThrough.apply(self.f(x))


class _RoundsInItsOwnCode(_Rounded):
    def forward(self, x):
        return x + _RoundStraightThrough.apply(self.f(x))


class _RoundsInAChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = _Rounded()

    def forward(self, x):
        return x + self.child(x)


def test_custom_autograd_function_is_kept_or_refused():
    """Tracing through a custom autograd.Function would drop its backward: in a child, the
    child stays one call (gradients as the original's); in the block's own code (Reformer's
    reversible layers), conversion is refused with the line, and the model is unchanged."""
    x = torch.randn(2, 5, 4)
    model = nn.Sequential(nn.Linear(4, 8), _RoundsInAChild(), _RoundsInAChild())
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=x)
    assert len(mhc.inspect(model, print_table=False)) == 2
    for m in (model, original):
        m(x).pow(2).sum().backward()
    grad, ref = model[1].child.f.weight.grad, original[1].child.f.weight.grad
    assert ref.abs().max() > 0 and _rel_err(grad, ref) <= 1e-5
    refused = nn.Sequential(nn.Linear(4, 8), _RoundsInItsOwnCode())
    snap = _snapshot(refused)
    with pytest.raises(mhc.CaptureError, match="test_coverage.py.*custom autograd.Function _RoundStraightThrough"):
        mhc.mhc_compile(refused, example_inputs=x)
    _assert_untouched(refused, snap)


class _BiasedAttention(nn.Module):
    """T5-style: the first layer makes a position bias from its own table and returns it;
    every later layer adds the same bias to its scores."""

    def __init__(self, first: bool, dim: int = 8):
        super().__init__()
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(16, 16)) if first else None

    def forward(self, x, bias=None):
        batch, length, _ = x.shape
        if bias is None:
            bias = self.table[:length, :length].expand(batch, -1, -1)  # the scores' full shape
        scores = self.q(x) @ x.transpose(1, 2) + bias
        return x + self.o(scores.softmax(-1) @ x), bias


def test_shared_position_bias_is_no_skip():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_BiasedAttention(True), _BiasedAttention(False)])

        def forward(self, x):
            bias = None
            for layer in self.layers:
                x, bias = layer(x, bias)
            return x

    model, x = Model(), torch.randn(2, 6, 8)
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=x)
    assert [r["block"] for r in mhc.inspect(model, print_table=False)] == ["layers.0", "layers.1"]
    with torch.no_grad():
        assert _rel_err(model(x), original(x)) <= 1e-5


class _DoublingState(_State):
    pass


class _TypeBranch(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x, state):
        h = self.f(x)
        if isinstance(state, _DoublingState):  # LongT5: isinstance(cache, EncoderDecoderCache)
            h = h * 2
        return x + h


def test_isinstance_on_an_object_argument_takes_the_calls_branch():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_TypeBranch(), _TypeBranch()])

        def forward(self, x, doubling=True):
            state = _DoublingState() if doubling else _State()
            for layer in self.layers:
                x = layer(x, state)
            return x

    model, x = Model(), torch.randn(2, 5, 8)
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=((x,), {"doubling": True}))
    with torch.no_grad():
        for doubling in (True, False):  # another class: another graph
            assert _rel_err(model(x, doubling), original(x, doubling)) <= 1e-5


def test_default_attention_mask_for_the_analysis_export():
    """LongT5: the forward builds its default mask only outside compilation, so torch.export
    sees ``None``; the analysis retries with the all-ones mask eager mode builds."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.layers = nn.ModuleList([_Idiom("plain"), _Idiom("plain")])

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None and not torch.compiler.is_compiling():
                attention_mask = torch.ones_like(input_ids)
            x = self.emb(input_ids) * attention_mask[..., None]
            for layer in self.layers:
                x = layer(x)
            return x

    model, ids = Model(), torch.randint(0, 11, (2, 5))
    ref = model(ids)
    mhc.mhc_compile(model, example_inputs={"input_ids": ids})
    assert len(mhc.inspect(model, print_table=False)) == 2
    assert _rel_err(model(input_ids=ids), ref) <= 1e-5


def test_asserts_and_a_buffer_sliced_by_a_size_trace():
    model = nn.Sequential(nn.Linear(4, 8), PositionTable(), PositionTable())
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=torch.randn(2, 5, 4))
    assert len(mhc.inspect(model, print_table=False)) == 2
    with torch.no_grad():
        for x in (torch.randn(2, 5, 4), torch.randn(3, 9, 4)):  # one graph for both lengths
            assert _rel_err(model(x), original(x)) <= 1e-5
    with pytest.raises(AssertionError):  # the assertion still runs in the rewritten block
        model(torch.randn(1, 40, 4))


class _Counter:
    def __init__(self):
        self.calls = 0


class _CountingAttention(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x, counter):
        counter.calls += 1
        if int(x.shape[-1]) > 10**6:  # a size as a Python int: this child stays one call
            x = x / 2
        return self.f(x) * counter.calls


def test_model_with_its_layer_loop_in_its_own_forward():
    """XLM: the layers' loop lives in the model's forward, which makes a state object when
    none is passed, adds an embedding ``expand_as`` the stream, and returns a ModelOutput."""
    from transformers.modeling_outputs import BaseModelOutput

    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(11, 8), nn.Embedding(32, 8)
            self.attn = nn.ModuleList([_CountingAttention(), _CountingAttention()])
            self.ffn = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, ids, counter=None):
            counter = _Counter() if counter is None else counter
            x = self.emb(ids)
            x = x + self.pos(torch.arange(ids.shape[1])).expand_as(x)
            for attn, ffn in zip(self.attn, self.ffn):
                x = x + attn(x, counter)
                x = x + ffn(x)
            return BaseModelOutput(last_hidden_state=x)

    model, ids = Looped(), torch.randint(0, 11, (2, 6))
    original = copy.deepcopy(model)
    mhc.mhc_compile(model, example_inputs=ids)
    assert [r["block"] for r in mhc.inspect(model, print_table=False)] == ["(root)"] * 4
    with torch.no_grad():
        for x in (ids, torch.randint(0, 11, (3, 9))):  # a fresh counter on every call
            out = model(x)
            assert isinstance(out, BaseModelOutput)
            assert _rel_err(out[0], original(x).last_hidden_state) <= 1e-5


def test_an_assert_inside_a_child_keeps_the_child_a_call():
    # LED's Longformer attention asserts on sizes, then pads by Python arithmetic on them: an
    # assert in a child being inlined must keep that child one call (in the block's own
    # code it is a torch._assert node), or the layer's dtype guard after it fails to trace
    from transformers import LEDConfig, LEDForConditionalGeneration

    torch.manual_seed(0)
    cfg = LEDConfig(vocab_size=97, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=4,
                    max_encoder_position_embeddings=64, max_decoder_position_embeddings=64)
    model = LEDForConditionalGeneration(cfg).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(3, 97, (2, 8))
    mhc.mhc_compile(model, example_inputs={"input_ids": ids, "decoder_input_ids": ids})
    assert any(r["block"].startswith("led.encoder.layers") for r in mhc.inspect(model, print_table=False))
    other = torch.randint(3, 97, (3, 12))
    with torch.no_grad():
        out = model(input_ids=other, decoder_input_ids=other).logits
        ref = original(input_ids=other, decoder_input_ids=other).logits
    assert _rel_err(out, ref) <= 1e-5
