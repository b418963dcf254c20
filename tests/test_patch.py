"""tritonops.nn.Linear, and patch()/unpatch() on a small GPT-style model (and on
transformers' Llama and GPT-2, randomly initialised, when that package is installed).
Thread isolation of the routed attention is in test_routing.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonops
from tritonops import reference, testing
from tritonops.ops import norm as norm_ops

from .utils import check_op

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's builtin, never rebound


# --------------------------------------------------------------------------- nn.Linear


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_linear_module_is_a_drop_in(device, activation):
    theirs = nn.Linear(20, 12, device=device)
    ours = tritonops.nn.Linear(20, 12, device=device, activation=activation)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 20, device=device)
    check_op(lambda x, w, b: ours(x),
             lambda x, w, b: reference.linear(x, w, b, activation), x, ours.weight, ours.bias, backward=False)
    assert ("activation='gelu_tanh'" in repr(ours)) == (activation is not None)
    with pytest.raises(ValueError, match="unknown activation"):
        tritonops.nn.Linear(2, 2, activation="swish")


# --------------------------------------------------------------------------- a GPT-style model


class Block(nn.Module):
    def __init__(self, d, heads, norm):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = norm(d), norm(d)
        self.qkv = nn.Linear(d, 3 * d)  # fused projection, split into views below
        self.proj = nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=37, d=32, heads=2, ctx=16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([Block(d, heads, nn.LayerNorm), Block(d, heads, nn.RMSNorm)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.log_probs = nn.LogSoftmax(dim=-1)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.log_probs(self.head(self.norm(x)))


def _step(model, idx, targets):
    """Log-probabilities and the gradients of one training step."""
    model.zero_grad(set_to_none=True)
    out = model(idx)
    if not isinstance(out, torch.Tensor):  # a transformers model's output
        out = out.logits.log_softmax(-1)
    loss = F.nll_loss(out.flatten(0, 1), targets.flatten())
    loss.backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare_to_unpatched(unpatched, patched, idx, targets):
    """Patched float32 vs unpatched float64 (truth) and unpatched float32 (torch's bar)."""
    ref_model = copy.deepcopy(unpatched).double()
    out, grads = _step(patched, idx, targets)
    ref_out, ref_grads = _step(ref_model, idx, targets)
    torch_out, torch_grads = _step(unpatched, idx, targets)
    testing.assert_close(out, ref_out, torch_out, what="log-probabilities")
    assert grads.keys() == torch_grads.keys()
    for name, g in grads.items():
        testing.assert_close(g, ref_grads[name], torch_grads[name], what=f"grad of {name}")


def _tiny_gpt_replaced():
    """patch's report on TinyGPT: every module it swaps, in named_modules order."""
    def block(i, norm):
        return [(f"blocks.{i}.ln1", norm, f"tritonops.nn.{norm}"), (f"blocks.{i}.ln2", norm, f"tritonops.nn.{norm}")] + [
            (f"blocks.{i}.{name}", "Linear", "tritonops.nn.Linear") for name in ("qkv", "proj", "fc", "out")]

    return block(0, "LayerNorm") + block(1, "RMSNorm") + [
        ("norm", "LayerNorm", "tritonops.nn.LayerNorm"), ("head", "Linear", "tritonops.nn.Linear"),
        ("log_probs", "LogSoftmax", "tritonops.nn.LogSoftmax")]


def test_patch_gpt_matches_unpatched_and_unpatch_restores(device):
    model = TinyGPT().to(device)
    state_keys = model.state_dict().keys()
    before = {n: type(m) for n, m in model.named_modules()}
    report = tritonops.patch(model)
    assert report.replaced == _tiny_gpt_replaced()
    assert report.counts() == {"Linear": 9, "LayerNorm": 3, "RMSNorm": 2, "LogSoftmax": 1}
    assert report.attention_routed and "scaled_dot_product_attention" in str(report)
    assert isinstance(model.blocks[0].qkv, tritonops.nn.Linear) and model.state_dict().keys() == state_keys

    from tritonops.ops import attention as attention_ops

    calls = []
    attention = attention_ops.attention
    attention_ops.attention = lambda *a, **k: calls.append(1) or attention(*a, **k)
    try:
        idx = torch.randint(0, 37, (2, 11), device=device)
        targets = torch.randint(0, 37, (2, 11), device=device)
        unpatched = copy.deepcopy(model)
        tritonops.unpatch(unpatched)
        _compare_to_unpatched(unpatched, model, idx, targets)
    finally:
        attention_ops.attention = attention
    assert len(calls) == 2  # one attention call per block went to tritonops
    assert F.scaled_dot_product_attention is TORCH_SDPA

    twin = copy.deepcopy(model)  # a copy of a patched model runs its own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert not torch.equal(twin(idx), model(idx))

    tritonops.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert "forward" not in model.__dict__
    assert not any("activation" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="not patched"):
        tritonops.unpatch(model)


def test_patch_only_some_ops(device):
    model = TinyGPT().to(device)
    report = tritonops.patch(model, ops=["linear"])
    assert report.replaced == [r for r in _tiny_gpt_replaced() if r[1] == "Linear"] and not report.attention_routed
    assert "forward" not in model.__dict__
    with pytest.raises(RuntimeError, match="patched already"):
        tritonops.patch(model)
    tritonops.unpatch(model)
    report = tritonops.patch(model, ops=["rms_norm", "attention"])
    assert report.counts() == {"RMSNorm": 2} and report.attention_routed
    tritonops.unpatch(model)
    with pytest.raises(ValueError, match="unknown ops"):
        tritonops.patch(model, ops=["conv"])


# --------------------------------------------------------------------------- a norm class of a library's own


class ToyRMSNorm(nn.Module):
    """A norm as transformers writes one (LlamaRMSNorm's arithmetic): a class of its own."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class OurToyRMSNorm(ToyRMSNorm):
    """What tritonops.huggingface.norm_class gives for such a class: its subclass on rms_norm."""

    def forward(self, x):
        return norm_ops.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)


def test_patch_swaps_the_norm_classes_huggingface_knows(device, monkeypatch):
    from tritonops import huggingface

    asked = []

    def norm_class(cls):
        asked.append(cls)
        return OurToyRMSNorm if cls is ToyRMSNorm else None

    monkeypatch.setattr(huggingface, "norm_class", norm_class)
    model = nn.Sequential(nn.Linear(13, 13), ToyRMSNorm(13), nn.LayerNorm(13), nn.Sequential(ToyRMSNorm(13))).to(device)
    unpatched = copy.deepcopy(model)
    report = tritonops.patch(model, ops=["linear", "rms_norm"])
    ours = f"{OurToyRMSNorm.__module__}.OurToyRMSNorm"
    assert report.replaced == [("0", "Linear", "tritonops.nn.Linear"), ("1", "ToyRMSNorm", ours),
                               ("3.0", "ToyRMSNorm", ours)]
    assert report.counts() == {"Linear": 1, "ToyRMSNorm": 2} and "2 x ToyRMSNorm" in str(report)
    assert asked == [nn.Sequential, ToyRMSNorm, nn.Sequential, ToyRMSNorm]  # never a class patch handles
    assert type(model[1]) is OurToyRMSNorm and type(model[2]) is nn.LayerNorm

    calls = []
    rms_norm = norm_ops.rms_norm
    monkeypatch.setattr(norm_ops, "rms_norm", lambda *a, **k: calls.append(1) or rms_norm(*a, **k))
    x = torch.randn(2, 5, 13, device=device)
    with torch.no_grad():
        out, ref, torch_out = model(x), copy.deepcopy(unpatched).double()(x.double()), unpatched(x)
    testing.assert_close(out, ref, torch_out)
    assert len(calls) == 2

    twin = copy.deepcopy(model)
    assert type(twin[1]) is OurToyRMSNorm and twin[1].weight is not model[1].weight
    tritonops.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in unpatched.modules()]
    assert not any("activation" in m.__dict__ for m in model.modules())

    asked.clear()
    report = tritonops.patch(model, ops=["linear", "layer_norm", "attention"])
    assert asked == [] and report.counts() == {"Linear": 1, "LayerNorm": 1}


# --------------------------------------------------------------------------- transformers, when installed


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patch_transformers_models(device, family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                         attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    model = model.to(device)
    unpatched = copy.deepcopy(model)
    before = [type(m) for m in model.modules()]
    report = tritonops.patch(model)
    if family == "llama":  # q, k, v, o, gate, up, down per layer and lm_head; two norms per layer and the last
        from tritonops import huggingface

        llama_norm = huggingface.norm_class(transformers.models.llama.modeling_llama.LlamaRMSNorm)
        expected = {"Linear": ("tritonops.nn.Linear", 15),
                    "LlamaRMSNorm": (f"{llama_norm.__module__}.{llama_norm.__qualname__}", 5)}
    else:  # its projections are transformers' Conv1D: only lm_head is an nn.Linear; ln_1, ln_2 per layer and ln_f
        expected = {"Linear": ("tritonops.nn.Linear", 1), "LayerNorm": ("tritonops.nn.LayerNorm", 5)}
    assert report.counts() == {name: n for name, (_, n) in expected.items()}, str(report)
    assert {(name, new) for _, name, new in report.replaced} == {(name, new) for name, (new, _) in expected.items()}

    from tritonops.ops import attention as attention_ops

    calls = []
    attention = attention_ops.attention
    attention_ops.attention = lambda *a, **k: calls.append(1) or attention(*a, **k)
    try:
        ids = torch.randint(0, 64, (2, 9), device=device)
        _compare_to_unpatched(unpatched, model, ids, torch.randint(0, 64, (2, 9), device=device))
    finally:
        attention_ops.attention = attention
    assert len(calls) == 2  # one per layer, through attn_implementation "tritonops"
    assert report.attn_implementation == {"": ("sdpa", "tritonops")} and "attn_implementation 'sdpa'" in str(report)
    assert model.config._attn_implementation == "tritonops" and "forward" not in model.__dict__
    assert F.scaled_dot_product_attention is TORCH_SDPA
    twin = copy.deepcopy(model)  # a patched copy, which unpatches on its own
    assert [type(m) for m in twin.modules()] == [type(m) for m in model.modules()]
    tritonops.unpatch(twin)
    assert [type(m) for m in twin.modules()] == before and twin.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "tritonops"
    tritonops.unpatch(model)
    assert [type(m) for m in model.modules()] == before and model.config._attn_implementation == "sdpa"


def test_patched_transformers_model_trains_with_gradient_checkpointing(device, monkeypatch):
    """Checkpointing recomputes each layer in backward, outside model.forward: attention still
    runs ours there (attn_implementation), and the gradients are the unpatched model's."""
    transformers = pytest.importorskip("transformers")
    from tritonops.ops import attention as attention_ops

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(device)
    unpatched = copy.deepcopy(model)
    # activation_checkpointing_enable in newer transformers, gradient_checkpointing_enable before
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    tritonops.patch(model)
    calls = []
    attention = attention_ops.attention
    monkeypatch.setattr(attention_ops, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    ids = torch.randint(0, 64, (2, 9), device=device)
    _compare_to_unpatched(unpatched, model, ids, torch.randint(0, 64, (2, 9), device=device))
    assert len(calls) == 2 * 2  # each layer's attention: in forward, and again in the recompute


def _tiny_llama(transformers, device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).to(device)


def test_transformers_model_that_cannot_switch_is_routed_by_its_forward(device, monkeypatch):
    """Some models only log that they cannot change attn_implementation: patch sees the config
    unchanged and routes SDPA in forward instead of claiming a switch."""
    transformers = pytest.importorskip("transformers")
    from tritonops.ops import attention as attention_ops

    model = _tiny_llama(transformers, device)
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", lambda self: False)
    report = tritonops.patch(model)
    assert report.attn_implementation is None and report.attention_routed and "forward" in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    calls = []
    attention = attention_ops.attention
    monkeypatch.setattr(attention_ops, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    model(torch.randint(0, 64, (1, 5), device=device))
    assert len(calls) == 2
    tritonops.unpatch(model)
    assert "forward" not in model.__dict__ and model.config._attn_implementation == "sdpa"


def test_unpatch_keeps_an_attn_implementation_chosen_since(device):
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(transformers, device)
    tritonops.patch(model)
    model.set_attn_implementation("eager")
    tritonops.unpatch(model)
    assert model.config._attn_implementation == "eager"


def test_patched_model_keeps_its_signature_and_pickles(device):
    """A model routed by its forward shows the forward's signature (transformers' Trainer reads
    it to keep dataset columns) and survives pickling (torch.save of the whole model)."""
    import inspect
    import io
    import pickle

    model = TinyGPT().to(device)
    signature = inspect.signature(model.forward)
    tritonops.patch(model)
    assert inspect.signature(model.forward) == signature
    idx = torch.randint(0, 37, (2, 11), device=device)
    want = model(idx)
    for loaded in (pickle.loads(pickle.dumps(model)), _torch_save_load(model, io)):
        assert loaded.forward.model is loaded and isinstance(loaded.blocks[0].qkv, tritonops.nn.Linear)
        torch.testing.assert_close(loaded(idx), want, rtol=0, atol=0)
        tritonops.unpatch(loaded)
        assert "forward" not in loaded.__dict__


def _torch_save_load(model, io):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_compiled_patched_model_keeps_our_ops_in_one_graph(device):
    model = TinyGPT().to(device)
    tritonops.patch(model)
    idx = torch.randint(0, 37, (2, 11), device=device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend=backend)(idx)
    assert len(graphs) == 1  # no graph break
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("tritonops.linear", "tritonops.layer_norm", "tritonops.rms_norm", "tritonops.log_softmax",
               "tritonops.attention"):
        assert any(op in t for t in ops), f"{op} missing from the compiled graph: {sorted(ops)}"
    assert not any("scaled_dot_product_attention" in t for t in ops)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    torch.testing.assert_close(out, model(idx), rtol=0, atol=0)
