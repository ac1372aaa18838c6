"""Packed multi-resolution forwards and efficient stochastic depth."""

import pytest
import torch
from conftest import randomize_

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.modeling.modeling_dinov2_hf import add_residual_stochastic_depth


def multicrop_batch(batch=3, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    global_crops = torch.randn(2 * batch, 3, 56, 56, generator=generator)
    local_crops = torch.randn(4 * batch, 3, 28, 28, generator=generator)
    masks = torch.rand(2 * batch, 16, generator=generator) < 0.4
    return global_crops, local_crops, masks


@pytest.mark.parametrize("registers", [0, 4])
def test_packed_equals_separate_outputs_and_gradients(tiny_kwargs, registers):
    config = Dinov2HFConfig(**{**tiny_kwargs, "image_size": 56}, num_register_tokens=registers)
    model = randomize_(Dinov2HFModel(config)).train()
    global_crops, local_crops, masks = multicrop_batch()

    def loss_of(outputs):
        return sum((o.last_hidden_state * torch.linspace(-1, 1, o.last_hidden_state.shape[-1])).sum() for o in outputs)

    packed = model.forward_packed([global_crops, local_crops], [masks, None])
    loss_of(packed).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    separate = [model(global_crops, bool_masked_pos=masks), model(local_crops)]
    loss_of(separate).backward()
    for p_out, s_out in zip(packed, separate):
        torch.testing.assert_close(p_out.last_hidden_state, s_out.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(p_out.prenorm_hidden_state, s_out.prenorm_hidden_state, rtol=0, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], parameter.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert packed[0].last_hidden_state.shape == (6, 1 + registers + 16, 64)
    assert packed[1].last_hidden_state.shape == (12, 1 + registers + 4, 64)


def test_stochastic_depth_structure_is_exact():
    """Each group: kept rows get x + (b / kept) * f(x), dropped rows stay x; f sees only kept rows."""
    torch.manual_seed(0)
    groups = ((6, 5), (8, 3))
    x = torch.randn(6 * 5 + 8 * 3, 4)
    seen_rows = []

    def branch(tokens, kept_groups):
        seen_rows.append(kept_groups)
        return torch.tanh(tokens) * 3.0

    out = add_residual_stochastic_depth(x, groups, branch, drop_rate=0.5)
    assert seen_rows == [((3, 5), (4, 3))]  # compute really drops: half of each group
    start = 0
    for batch_size, seq_len in groups:
        kept = max(int(batch_size * 0.5), 1)
        rows_x = x[start : start + batch_size * seq_len].view(batch_size, seq_len, -1)
        rows_out = out[start : start + batch_size * seq_len].view(batch_size, seq_len, -1)
        changed = [not torch.equal(rows_x[i], rows_out[i]) for i in range(batch_size)]
        assert sum(changed) == kept
        for i in range(batch_size):
            expected = rows_x[i] + (batch_size / kept) * torch.tanh(rows_x[i]) * 3.0 if changed[i] else rows_x[i]
            torch.testing.assert_close(rows_out[i], expected)
        start += batch_size * seq_len


def test_stochastic_depth_expectation():
    """The average over random subsets converges to the deterministic x + f(x)."""
    torch.manual_seed(0)
    groups = ((5, 2),)
    x = torch.randn(10, 3)

    def branch(tokens, kept_groups):
        return tokens.square()

    trials = 4000
    mean = sum(add_residual_stochastic_depth(x, groups, branch, drop_rate=0.4) for _ in range(trials)) / trials
    expected = x + x.square()
    assert (mean - expected).abs().max() < 0.1 * expected.abs().max()
    # and a tighter check on the mean over all tokens
    assert abs(mean.mean() - expected.mean()) < 0.02


def test_drop_path_in_model_only_in_training(tiny_kwargs):
    config = Dinov2HFConfig(**tiny_kwargs, drop_path_rate=0.5)
    model = randomize_(Dinov2HFModel(config))
    x = torch.randn(4, 3, 56, 56)
    model.eval()
    with torch.no_grad():
        a, b = model(x).last_hidden_state, model(x).last_hidden_state
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(x).last_hidden_state
    torch.manual_seed(0)
    d = model(x).last_hidden_state
    torch.manual_seed(1)
    e = model(x).last_hidden_state
    assert torch.equal(c, d) and not torch.equal(c, e)  # seeded determinism, random otherwise
    assert not torch.allclose(a, c)


def test_drop_path_rates_uniform_or_linear(tiny_kwargs):
    uniform = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs, drop_path_rate=0.3))
    assert [layer.drop_path_rate for layer in uniform.encoder.layer] == [0.3, 0.3]
    linear = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs, drop_path_rate=0.3, drop_path_uniform=False))
    assert [round(layer.drop_path_rate, 6) for layer in linear.encoder.layer] == [0.0, 0.3]


def test_gradient_checkpointing_same_gradients(tiny_kwargs):
    model = randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs))).train()
    global_crops, local_crops, masks = multicrop_batch(batch=2)

    def grads():
        model.zero_grad()
        outputs = model.forward_packed([global_crops, local_crops], [masks, None])
        sum(o.last_hidden_state.square().sum() for o in outputs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.encoder.layer[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointed = grads()
    assert len(calls) == 3  # forward, then recomputed during backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
