"""torch.compile(fullgraph=True) of converted ResNets: training steps and the eval forward trace as one graph
(no graph breaks) and match eager, in bn mode and conv mode (single-pass convolutions), NCHW and channels_last."""
import copy

import pytest
import torch

import fusedres
from helpers import mixed_resnet


def _train_steps(model, forward, xs, targets):
    """SGD steps (forward through `forward`, backward and the optimizer step in eager); returns the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, t in zip(xs, targets):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("mode,channels_last", [("bn", False), ("conv", True)])
def test_compiled_training_and_eval_match_eager(on_test_device, mode, channels_last):
    torch._dynamo.reset()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stock = mixed_resnet(randomise_running_stats=True).to(memory_format=fmt)
    eager = fusedres.convert(copy.deepcopy(stock), mode=mode)
    compiled_model = fusedres.convert(copy.deepcopy(stock), mode=mode)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: any graph break raises
    xs = [torch.randn(4, 3, 16, 16).contiguous(memory_format=fmt) for _ in range(2)]
    ts = [torch.randint(0, 5, (4,)) for _ in range(2)]

    losses_e = _train_steps(eager, eager, xs, ts)
    losses_c = _train_steps(compiled_model, compiled, xs, ts)
    losses_s = _train_steps(stock, stock, xs, ts)
    torch.testing.assert_close(losses_c, losses_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses_c, losses_s, rtol=1e-3, atol=1e-3)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(compiled_model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)

    compiled_model.eval()
    eager.eval()
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=fmt)
    with torch.no_grad():
        y_c, y_e = compiled(x), eager(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)


def test_compiled_eval_has_no_graph_breaks(on_test_device):
    """torch._dynamo.explain on the eval forward of a converted model: one graph, zero breaks, and the graph
    calls the fused ops (not a decomposition of them)."""
    torch._dynamo.reset()
    model = fusedres.convert(mixed_resnet(randomise_running_stats=True)).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    code = "\n".join(g.code for g in explanation.graphs)
    assert "fusedres.bn_act_eval" in code and "fusedres.dual_bn_act_eval" in code
