"""End to end: AdamW on a tiny Hugging Face Llama under autocast, patched and unpatched from
the same seed, and a patched model's state_dict in both directions."""

import copy

import pytest
import torch
import torch.nn.functional as F

import tritonops
from tritonops import testing

transformers = pytest.importorskip("transformers")

STEPS = 10
VOCAB, SEQ, BATCH = 96, 24, 2


def _llama(device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).to(device)


def _train(model, batches, autocast_dtype, device):
    """Per-step losses of AdamW on `batches`, under autocast_dtype (None: float32 throughout)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.detach().double())
    return torch.stack(losses)


def test_adamw_on_patched_llama_under_autocast_tracks_torch(device):
    """The patched run's per-step losses stay as close to the float32 run as torch's own
    bf16 autocast run does: relative to float32's losses, at most twice torch's deviation
    plus bfloat16's floor (tritonops.testing's rule, on the loss curve of 10 steps)."""
    model = _llama(device)
    patched = copy.deepcopy(model)
    report = tritonops.patch(patched)
    assert report.counts() == {"Linear": 2 * 7 + 1, "LlamaRMSNorm": 2 * 2 + 1} and report.attention_routed
    float32 = copy.deepcopy(model)
    # one batch of counting sequences, seen every step: a curve the model really descends
    start = torch.tensor([[3], [40]])
    batches = [((start + torch.arange(SEQ)) % VOCAB).to(device)] * STEPS

    reference = _train(float32, batches, None, device)
    theirs = _train(model, batches, torch.bfloat16, device)
    ours = _train(patched, batches, torch.bfloat16, device)
    assert reference[-1] < 0.8 * reference[0]  # it learns: the comparison is over a moving curve
    testing.assert_close(ours, reference, theirs, dtype=torch.bfloat16, what="per-step losses")

    # the trained patched model's state_dict is torch's: it loads into an unpatched model and into a
    # patched one, and the unpatched model it came from runs exactly as the one it went into
    state = patched.state_dict()
    assert state.keys() == model.state_dict().keys()
    unpatched = _llama(device)
    unpatched.load_state_dict(state)
    repatched = _llama(device)
    tritonops.patch(repatched)
    repatched.load_state_dict(state)
    truth = copy.deepcopy(unpatched).double()
    ids = batches[0]
    with torch.no_grad():
        want = unpatched(ids).logits
        testing.assert_close(repatched(ids).logits, truth(ids).logits, want, what="logits after a round trip")
        tritonops.unpatch(patched)
        torch.testing.assert_close(patched(ids).logits, want, rtol=0, atol=0)
