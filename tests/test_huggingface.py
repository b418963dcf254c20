"""tritonops.huggingface on tiny randomly initialised transformers models: the "tritonops"
attention implementation against transformers' "sdpa", the RMSNorm adapters against the
classes they replace, and the registration hook that `import tritonops` installs.

Models are held to a float64 truth with torch's float32 error as the bar. transformers' norms
(and T5's) compute in float32 even in a float64 model, so the truth runs their formula in
float64 instead (`_float64_truth`); everything else in these models computes in the model's
dtype or from float32 constants (rotary tables) that all three runs share.
"""

import copy
import importlib
import os
import pathlib
import pickle
import subprocess
import sys
import types
import uuid
import warnings

import pytest
import torch
import torch.nn.functional as F

import tritonops
from tritonops import huggingface as hf
from tritonops import testing
from tritonops.ops import attention as attention_ops
from tritonops.ops import norm as norm_ops

from .utils import check_op

transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 64


# --------------------------------------------------------------------------- helpers


def _config(family: str, **overrides):
    """A tiny config: hidden 32, 2 layers, 4 heads of 8 (2 key/value heads), vocabulary 64."""
    configs = {
        "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "olmo2": transformers.Olmo2Config,
        "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    if family == "gemma2":
        kwargs["attn_logit_softcapping"] = None  # sdpa (and ours) refuse soft-capping
    kwargs.update(overrides)
    return configs[family](**kwargs)


def _causal_lm(config, attn_implementation: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                          attn_implementation=attn_implementation)
    return model.eval()


def _exact_norm(self, x):
    """A transformers RMSNorm's formula in x's own dtype (theirs computes in float32)."""
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    weight = 1.0 + self.weight if type(self).__name__ in {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"} \
        else self.weight
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _float64_truth(model):
    """A float64 copy of `model` whose norms compute in float64 (see the module docstring)."""
    truth = copy.deepcopy(model).double()
    norms = 0
    for module in truth.modules():
        cls = type(module)
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith(("RMSNorm", "LayerNorm")):
            module.forward = types.MethodType(_exact_norm, module)
            norms += 1
    assert norms, "no transformers norm found"
    return truth


def _step(model, inputs: dict, targets):
    """Log-probabilities and parameter gradients of one training step."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs).logits.log_softmax(-1)
    F.nll_loss(out.flatten(0, 1), targets.flatten()).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_like_torch(ours, theirs, inputs: dict, targets):
    """`ours` (float32) against the float64 truth of `theirs`, with `theirs` (float32) as the bar:
    log-probabilities and every gradient. The two hold the same weights."""
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                  strict=True))
    truth = _float64_truth(theirs)
    out, grads = _step(ours, inputs, targets)
    ref_out, ref_grads = _step(truth, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()},
                               targets)
    torch_out, torch_grads = _step(theirs, inputs, targets)
    testing.assert_close(out, ref_out, torch_out, what="log-probabilities")
    assert grads.keys() == torch_grads.keys() and grads
    for name, g in grads.items():
        testing.assert_close(g, ref_grads[name], torch_grads[name], what=f"grad of {name}")


def _padding_mask(kind: str | None, batch: int, length: int, device):
    if kind is None:
        return None
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if kind == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    else:
        mask[0, -4:] = 0
    return mask


@pytest.fixture(autouse=True, scope="module")
def _registered():
    # what `import tritonops` arranges (checked in a fresh process below); here, whatever the order of imports
    hf.register()


@pytest.fixture
def attention_calls(monkeypatch):
    """Records the arguments of every tritonops.attention call (the op still runs)."""
    calls = []
    op = attention_ops.attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(dict(query=query.shape, key=key.shape, mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa))
        return op(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                  enable_gqa=enable_gqa)

    monkeypatch.setattr(attention_ops, "attention", spy)
    return calls


@pytest.fixture
def norm_calls(monkeypatch):
    """Counts tritonops.rms_norm calls (the op still runs)."""
    calls = []
    op = norm_ops.rms_norm
    monkeypatch.setattr(norm_ops, "rms_norm", lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


# --------------------------------------------------------------------------- attention: the function


def _module(**attrs):
    return types.SimpleNamespace(**attrs)


@pytest.mark.parametrize("case", ["causal", "causal_prefill_longer_cache", "decode", "bool_mask", "float_mask",
                                  "not_causal_kwarg", "module_without_is_causal", "position_bias",
                                  "position_bias_and_mask"])
def test_attention_forward_matches_sdpa_attention_forward(device, case, attention_calls):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, HKV, D = 2, 4, 2, 8
    L, S = {"causal_prefill_longer_cache": (5, 9), "decode": (1, 7)}.get(case, (6, 6))
    module = _module(is_causal=True, num_key_value_groups=H // HKV)
    q = torch.randn(B, H, L, D, device=device)
    k, v = torch.randn(B, HKV, S, D, device=device), torch.randn(B, HKV, S, D, device=device)
    args, kwargs = [q, k, v], {}
    mask = None
    if case == "bool_mask":
        mask = torch.ones(B, 1, L, S, dtype=torch.bool, device=device).tril()
        mask[0, :, :, :2] = False  # left padding: the first two rows of batch 0 attend to nothing
    elif case == "float_mask":
        args.append(torch.randn(B, 1, L, S, device=device))
    elif case == "not_causal_kwarg":
        kwargs["is_causal"] = False
    elif case == "module_without_is_causal":
        module = _module(num_key_value_groups=H // HKV)  # sdpa's default: causal
    elif case.startswith("position_bias"):
        args.append(torch.randn(1, H, L, S, device=device))
        if case == "position_bias_and_mask":
            mask = torch.rand(B, 1, L, S, device=device) > 0.3

    def call(fn):
        def run(q, k, v, extra=None):
            attention_mask, position_bias = mask, None
            if case == "float_mask":
                attention_mask = extra
            elif extra is not None:
                position_bias = extra
            out, weights = fn(module, q, k, v, attention_mask, scaling=0.3, position_bias=position_bias, **kwargs)
            assert weights is None
            return out
        return run

    ours = check_op(call(hf.attention_forward), call(sdpa_attention_forward), *args)
    assert ours.shape == (B, L, H, D) and ours.is_contiguous()
    causal = case in ("causal", "causal_prefill_longer_cache", "module_without_is_causal")
    assert attention_calls and all(c["is_causal"] == causal and c["enable_gqa"] and c["scale"] == 0.3
                                   for c in attention_calls)
    if case == "causal_prefill_longer_cache":
        assert all(c["key"][-2] == L for c in attention_calls)  # the cache past the queries is cut


def test_attention_forward_passes_dropout_and_refuses_what_it_cannot_do(device, attention_calls, monkeypatch):
    q = k = v = torch.randn(1, 2, 3, 8, device=device)
    module = _module(is_causal=True)
    hf.attention_forward(module, q, k, v, None, dropout=0.25)
    assert attention_calls[-1]["dropout_p"] == 0.25 and attention_calls[-1]["scale"] is None
    with pytest.raises(ValueError, match="softcap"):
        hf.attention_forward(module, q, k, v, None, softcap=50.0)
    for sinks in ("s_aux", "sinks"):
        with pytest.raises(ValueError, match="attention sinks"):
            hf.attention_forward(module, q, k, v, None, **{sinks: torch.zeros(2, device=device)})
    assert len(attention_calls) == 1
    monkeypatch.setattr(hf, "_warned_output_attentions", False)
    with pytest.warns(UserWarning, match="output_attentions"):
        assert hf.attention_forward(module, q, k, v, None, output_attentions=True)[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.attention_forward(module, q, k, v, None, output_attentions=True)  # once only


def test_soft_capping_model_is_refused(device):
    model = _causal_lm(_config("gemma2", attn_logit_softcapping=50.0), "tritonops").to(device)
    with pytest.raises(ValueError, match="softcap"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4), device=device))


# --------------------------------------------------------------------------- attention: models


@pytest.mark.parametrize("how, gqa, padding", [
    ("from_config", True, None),
    ("config", False, "left"),
    ("from_pretrained", True, "right"),
    ("set_attn_implementation", True, "left"),
])
def test_model_with_tritonops_attention_matches_sdpa(device, how, gqa, padding, attention_calls, tmp_path):
    config = _config("llama", num_key_value_heads=2 if gqa else 4)
    theirs = _causal_lm(config, "sdpa").to(device)
    if how == "from_config":
        ours = _causal_lm(config, "tritonops").to(device)  # same seed: the same weights
    elif how == "config":
        ours = transformers.LlamaForCausalLM(_config("llama", num_key_value_heads=config.num_key_value_heads,
                                                     attn_implementation="tritonops"))
        ours.load_state_dict(theirs.state_dict())
        ours = ours.to(device).eval()
    elif how == "from_pretrained":
        theirs.save_pretrained(tmp_path)
        ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tritonops")
        ours = ours.to(device)
    else:
        ours = copy.deepcopy(theirs)
        ours.set_attn_implementation("tritonops")
    assert ours.config._attn_implementation == "tritonops" and theirs.config._attn_implementation == "sdpa"
    ids = torch.randint(0, VOCAB, (2, 12), device=device)
    mask = _padding_mask(padding, 2, 12, device)
    inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    _assert_like_torch(ours, theirs, inputs, torch.randint(0, VOCAB, (2, 12), device=device))
    assert len(attention_calls) == config.num_hidden_layers  # one forward of ours, one call per layer
    for call in attention_calls:
        assert call["enable_gqa"] == gqa and call["dropout_p"] == 0.0
        # no padding: causal by flag, no mask; padding: transformers' 4-D boolean mask (sdpa's)
        assert call["is_causal"] == (mask is None) and (call["mask"] is None) == (mask is None)
        if mask is not None:
            assert call["mask"].dtype == torch.bool and call["mask"].shape == (2, 1, 12, 12)


def test_generate_with_tritonops_attention_matches_sdpa(device, attention_calls):
    """Prefill and decoding (one query against the cache) with a left-padded batch."""
    config = _config("llama")
    theirs = _causal_lm(config, "sdpa").to(device)
    ours = _causal_lm(config, "tritonops").to(device)
    ids = torch.randint(1, VOCAB, (2, 7), device=device)
    mask = _padding_mask("left", 2, 7, device)

    def generate(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    sequences, scores = generate(ours)
    truth_sequences, truth_scores = generate(_float64_truth(theirs))
    torch_sequences, torch_scores = generate(theirs)
    assert torch.equal(sequences, torch_sequences) and torch.equal(sequences, truth_sequences)
    testing.assert_close(scores, truth_scores, torch_scores, what="scores")
    assert [c["query"][-2] for c in attention_calls] == [7] * 2 + [1] * 6  # prefill, then 3 decoding steps
    assert all(c["mask"] is not None and not c["is_causal"] for c in attention_calls)


def test_attention_dropout_reaches_the_op_in_training_only(device, attention_calls):
    config = _config("llama", attention_dropout=0.25)
    model = _causal_lm(config, "tritonops").to(device).train()
    ids = torch.randint(0, VOCAB, (2, 8), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert [c["dropout_p"] for c in attention_calls] == [0.25] * config.num_hidden_layers
    q_grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert q_grad is not None and torch.isfinite(q_grad).all() and q_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert [c["dropout_p"] for c in attention_calls[config.num_hidden_layers:]] == [0.0] * config.num_hidden_layers


def test_compiled_model_keeps_our_attention_and_norms_in_one_graph(device):
    model = _causal_lm(_config("llama"), "tritonops").to(device)
    for module in model.modules():
        adapter = hf.norm_class(type(module))
        if adapter is not None:
            module.__class__ = adapter
    ids = torch.randint(0, VOCAB, (2, 8), device=device)
    mask = _padding_mask("left", 2, 8, device)
    targets = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend=backend)(input_ids=ids, attention_mask=mask).logits
    assert targets.count("tritonops.attention.default") == 2 and targets.count("tritonops.rms_norm.default") == 5
    assert not any("scaled_dot_product_attention" in t or "rsqrt" in t for t in targets)
    torch.testing.assert_close(out, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_t5_with_position_bias_matches_sdpa(device, attention_calls):
    """Encoder (bidirectional, padded), causal decoder and cross-attention, T5's learned
    relative position bias as an additive mask with a gradient."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa")
    ours = copy.deepcopy(theirs)
    ours.set_attn_implementation("tritonops")
    theirs, ours = theirs.to(device).eval(), ours.to(device).eval()
    ids = torch.randint(0, VOCAB, (2, 9), device=device)
    inputs = {"input_ids": ids, "attention_mask": _padding_mask("right", 2, 9, device),
              "decoder_input_ids": torch.randint(0, VOCAB, (2, 6), device=device)}
    _assert_like_torch(ours, theirs, inputs, torch.randint(0, VOCAB, (2, 6), device=device))
    assert len(attention_calls) == 3 * config.num_layers  # encoder self, decoder self and cross
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert ours.get_parameter(bias).grad.abs().sum() > 0


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_install_registers_a_loaded_transformers(monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    monkeypatch.setattr(AttentionInterface, "_global_mapping",
                        {k: v for k, v in AttentionInterface._global_mapping.items() if k != "tritonops"})
    monkeypatch.setattr(AttentionMaskInterface, "_global_mapping",
                        {k: v for k, v in AttentionMaskInterface._global_mapping.items() if k != "tritonops"})
    assert "tritonops" not in ALL_ATTENTION_FUNCTIONS
    hf.install()  # transformers.modeling_utils is loaded: registers at once
    hf.install()
    hf.register()
    assert ALL_ATTENTION_FUNCTIONS["tritonops"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["tritonops"] is sdpa_mask
    assert not any(isinstance(f, hf._PostImportHook) for f in sys.meta_path)
    with pytest.raises(ValueError, match="is not supported"):
        _causal_lm(_config("llama", num_hidden_layers=1), "tritonops_not_registered")

    def broken():
        raise RuntimeError("no transformers here")

    monkeypatch.setattr(hf, "register", broken)
    with pytest.warns(UserWarning, match="could not register.*no transformers here"):
        hf.install()


def test_post_import_hook_runs_after_the_module_and_never_breaks_its_import(tmp_path, monkeypatch):
    name = f"tritonops_hook_probe_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = hf._PostImportHook(name, lambda: seen.append(sys.modules[name].VALUE + 1))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    module = __import__(name)
    assert seen == [42] and hook not in sys.meta_path and module.__loader__.get_source(name) == "VALUE = 41\n"
    monkeypatch.delitem(sys.modules, name)

    def broken():
        raise RuntimeError("boom")

    hook = hf._PostImportHook(name, broken)
    sys.meta_path.insert(0, hook)
    with pytest.warns(UserWarning, match=f"post-import hook for {name} failed: RuntimeError: boom"):
        assert __import__(name).VALUE == 41
    assert hook not in sys.meta_path
    monkeypatch.delitem(sys.modules, name)


_IMPORT_FIRST = """
import sys, torch, tritonops
assert "transformers.modeling_utils" not in sys.modules, "import tritonops imported transformers.modeling_utils"
assert any(isinstance(f, tritonops.huggingface._PostImportHook) for f in sys.meta_path), "no hook installed"

class UserNorm(torch.nn.Module):  # Llama's norm code in a class of the user's
    def __init__(self, n):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        input_dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

norm_class = tritonops.huggingface.norm_class
assert norm_class(UserNorm) is None and norm_class(torch.nn.Linear) is None
assert "transformers" not in sys.modules, "norm_class imported transformers"
from transformers import AutoModelForCausalLM, LlamaConfig
config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
model = AutoModelForCausalLM.from_config(config, attn_implementation="tritonops")
assert norm_class(UserNorm) is not None, "a class seen before transformers loaded is never adapted"
"""

_TRANSFORMERS_FIRST = """
import sys, transformers.modeling_utils, tritonops
"""

_CHECK_REGISTERED = """
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
hf = tritonops.huggingface
assert ALL_ATTENTION_FUNCTIONS["tritonops"] is hf.attention_forward, "not registered"
assert ALL_MASK_ATTENTION_FUNCTIONS["tritonops"] is sdpa_mask, "no mask function registered"
assert not any(isinstance(f, hf._PostImportHook) for f in sys.meta_path), "the hook is still in sys.meta_path"
"""


def test_import_tritonops_registers_with_transformers_imported_before_or_after():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    runs = {script: subprocess.Popen([sys.executable, "-c", script + _CHECK_REGISTERED], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for script in (_IMPORT_FIRST, _TRANSFORMERS_FIRST)}
    for script, run in runs.items():
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, f"{script}\n{output}"


# --------------------------------------------------------------------------- norm adapters


_FAMILY_OF = {  # transformers class -> the family norm_class must find, by code alone
    ("llama", "LlamaRMSNorm"): "llama", ("mistral", "MistralRMSNorm"): "llama", ("qwen2", "Qwen2RMSNorm"): "llama",
    ("qwen3", "Qwen3RMSNorm"): "llama", ("phi3", "Phi3RMSNorm"): "llama", ("gemma", "GemmaRMSNorm"): "gemma",
    ("gemma2", "Gemma2RMSNorm"): "gemma", ("gemma3", "Gemma3RMSNorm"): "gemma", ("olmo2", "Olmo2RMSNorm"): "olmo2",
    ("gpt_oss", "GptOssRMSNorm"): "olmo2", ("llama4", "Llama4TextRMSNorm"): "llama4",
    # other formulas: an unweighted or gated norm, T5's dtype rule, Gemma3n's optional scale
    ("t5", "T5LayerNorm"): None, ("gemma3n", "Gemma3nRMSNorm"): None, ("mamba2", "MambaRMSNormGated"): None,
    ("llama", "LlamaMLP"): None, ("llama", "LlamaAttention"): None, ("llama", "LlamaDecoderLayer"): None,
}


def _hf_class(model: str, name: str) -> type:
    return getattr(importlib.import_module(f"transformers.models.{model}.modeling_{model}"), name)


def test_norm_class_recognises_families_by_their_code():
    for (model, name), family in _FAMILY_OF.items():
        cls = _hf_class(model, name)
        adapter = hf.norm_class(cls)
        assert hf._family(cls) == family, name
        if family is None:
            assert adapter is None, name
            continue
        assert issubclass(adapter, cls) and adapter is hf.norm_class(cls)  # cached
        assert adapter.__name__ == adapter.__qualname__ == f"Tritonops{name}"
        assert adapter.__dict__.keys() - {"__module__", "__qualname__", "__doc__", "__reduce_ex__"} \
            == {"forward", "_tritonops_base"}
        assert hf.norm_class(adapter) is None
    # every family's reference exists in the installed transformers and computes what its adapter does
    for fam in hf._FAMILIES:
        module, name = fam.reference.rsplit(".", 1)
        reference = getattr(importlib.import_module(module), name)
        assert fam.fingerprints() is not None and fam._pin_failure() is None, fam.name
        assert hf._family(reference) == fam.name
    for cls in (torch.nn.Linear, torch.nn.RMSNorm, int, tritonops.nn.RMSNorm):
        assert hf.norm_class(cls) is None

    class UserLlamaNorm(torch.nn.Module):  # a model's own copy, outside transformers
        """Same code, a docstring and other names."""

        def __init__(self, hidden_size, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.variance_epsilon = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Normalise."""
            input_dtype = x.dtype
            x = x.to(torch.float32)
            var = x.pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(var + self.variance_epsilon)
            return self.weight * x.to(input_dtype)

    class OffByOne(UserLlamaNorm):
        def forward(self, x):
            input_dtype = x.dtype
            x = x.to(torch.float32)
            var = x.pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(var + self.variance_epsilon)
            return self.weight * x.to(input_dtype) + 1

    class OtherConstant(UserLlamaNorm):
        def forward(self, x):
            input_dtype = x.dtype
            x = x.to(torch.float32)
            var = x.pow(4).mean(-1, keepdim=True)
            x = x * torch.rsqrt(var + self.variance_epsilon)
            return self.weight * x.to(input_dtype)

    assert hf._family(UserLlamaNorm) == "llama"
    assert hf._family(OffByOne) is None and hf._family(OtherConstant) is None
    assert hf._family(type("GemmaLike", (UserLlamaNorm,), {"forward": _hf_class("gemma", "GemmaRMSNorm").forward})) \
        is None  # Gemma's forward, but no Gemma _norm


class ConfigRMSNorm(torch.nn.Module):
    """A reference whose constructor wants a config: the semantics pin builds it bare."""

    def __init__(self, config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(config.hidden_size))
        self.variance_epsilon = config.rms_norm_eps

    def forward(self, x):
        input_dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def test_family_with_a_reference_that_computes_otherwise_is_disabled_with_one_warning(monkeypatch):
    olmo2, gemma, llama = (_hf_class("olmo2", "Olmo2RMSNorm"), _hf_class("gemma", "GemmaRMSNorm"),
                           _hf_class("llama", "LlamaRMSNorm"))

    def path(cls):
        return f"{cls.__module__}.{cls.__qualname__}"

    families = (
        # Olmo2 rounds after the weight, Llama's adapter before it: another output dtype
        hf._Family("stale_dtype", path(olmo2), ("forward",), "variance_epsilon", hf._weight_then_input_dtype),
        # Gemma scales by 1 + weight, Olmo2's adapter by weight: other values, the same dtype
        hf._Family("stale_values", path(gemma), ("forward", "_norm"), "eps", hf._input_dtype),
        # references that are gone: the family is off, silently
        hf._Family("gone_class", f"{llama.__module__}.NoSuchRMSNorm", ("forward",), "eps", hf._input_dtype),
        hf._Family("gone_module", "transformers.models.no_such_model.modeling_x.XRMSNorm", ("forward",), "eps",
                   hf._input_dtype),
        # a constructor that wants a config: built bare for the pin, and it passes
        hf._Family("config", path(ConfigRMSNorm), ("forward",), "variance_epsilon", hf._weight_then_input_dtype),
    )
    monkeypatch.setattr(hf, "_FAMILIES", families)
    monkeypatch.setattr(hf, "_adapters", {})
    with pytest.warns(UserWarning) as record:
        assert hf.norm_class(olmo2) is None and hf.norm_class(gemma) is None
        assert hf.norm_class(_hf_class("gpt_oss", "GptOssRMSNorm")) is None  # Olmo2's code: no second warning
        assert hf.norm_class(_hf_class("gemma2", "Gemma2RMSNorm")) is None
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages
    assert "stale_dtype RMSNorm family: transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm gives torch.bfloat16" \
        in messages[0] and "the adapter gives torch.float32" in messages[0]
    assert "stale_values RMSNorm family: transformers.models.gemma.modeling_gemma.GemmaRMSNorm computes other values" \
        in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert families[2].fingerprints() is None and families[3].fingerprints() is None
        assert not families[2].usable() and not families[3].usable()
        adapter = hf.norm_class(llama)  # Llama's code, as ConfigRMSNorm's
    assert adapter is not None and adapter.forward is families[4].forward and hf._family(llama) == "config"


@pytest.mark.parametrize("model, name", [("llama", "LlamaRMSNorm"), ("gemma", "GemmaRMSNorm"),
                                         ("olmo2", "Olmo2RMSNorm"), ("llama4", "Llama4TextRMSNorm")])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)])
def test_norm_adapter_output_dtype_and_values(device, model, name, x_dtype, w_dtype, norm_calls):
    cls = _hf_class(model, name)
    theirs = cls(40).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
    theirs = theirs.to(w_dtype)
    ours = copy.deepcopy(theirs)
    ours.__class__ = hf.norm_class(cls)
    x = (torch.randn(3, 5, 40, device=device, dtype=torch.float64) * 3).to(x_dtype)
    out, torch_out = ours(x), theirs(x)
    assert norm_calls == [1]  # ours ran, not a fallback
    assert out.dtype == torch_out.dtype and out.shape == torch_out.shape
    with torch.autocast(device.type, dtype=torch.bfloat16):  # on CUDA it would run rms_norm in float32
        assert ours(x).dtype == theirs(x).dtype
    truth = _exact_norm(theirs.double(), x.double())
    # a float64 input: theirs computes in float32, ours in float64
    testing.assert_close(out, truth, torch_out if x_dtype != torch.float64 else None, what=f"{name} output")


def test_norm_adapter_keeps_parameters_hooks_and_pickles(device):
    cls = _hf_class("llama", "LlamaRMSNorm")
    module = cls(16, eps=1e-5).to(device)
    keys, weight = module.state_dict().keys(), module.weight
    seen = []
    hook = module.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    module.__class__ = hf.norm_class(cls)
    assert isinstance(module, cls) and module.weight is weight and module.state_dict().keys() == keys
    assert repr(module) == "TritonopsLlamaRMSNorm((16,), eps=1e-05)"
    module(torch.randn(2, 16, device=device))
    assert seen == ["TritonopsLlamaRMSNorm"]
    hook.remove()  # a lambda does not pickle
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert type(twin) is type(module) and torch.equal(twin.weight, module.weight)
        assert twin.variance_epsilon == 1e-5
    module.__class__ = cls  # what unpatch does
    assert type(module) is cls and module.state_dict().keys() == keys


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma", "gemma2", "gemma3"])
def test_norm_adapters_in_a_model_match_unpatched(device, family, norm_calls):
    theirs = _causal_lm(_config(family), "eager" if family == "gemma2" else "sdpa").to(device)
    if family == "gemma2":
        # Gemma2 refuses sdpa for its soft-capping (off here); eager's float32 softmax would
        # spoil the float64 truth
        theirs.config._attn_implementation = "sdpa"
    ours = copy.deepcopy(theirs)
    norms = [m for m in ours.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms
    for module in norms:  # every transformers norm class in the model is one we adapt
        adapter = hf.norm_class(type(module))
        assert adapter is not None, type(module).__name__
        module.__class__ = adapter
    ids = torch.randint(0, VOCAB, (2, 10), device=device)
    _assert_like_torch(ours, theirs, {"input_ids": ids}, torch.randint(0, VOCAB, (2, 10), device=device))
    assert len(norm_calls) == len(norms)  # one forward of ours


def test_patch_swaps_transformers_norms(device):
    """tritonops.patch swaps a model's transformers norms for their adapters, and unpatch back."""
    model = _causal_lm(_config("llama"), "sdpa").to(device)
    before = {n: type(m) for n, m in model.named_modules()}
    report = tritonops.patch(model)
    assert report.counts() == {"LlamaRMSNorm": 5, "Linear": 15}
    assert type(model.model.norm) is hf.norm_class(before["model.norm"])
    tritonops.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
