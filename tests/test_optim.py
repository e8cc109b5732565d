"""LARS against a per-parameter loop of the reference semantics; parameter groups; schedule."""
import math

import pytest
import torch

from wcl_fast.config import ModelConfig, OptimConfig
from wcl_fast.model import build_model
from wcl_fast.optim import build_optimizer, excluded_parameter_names, learning_rate, parameter_groups


def _reference_step(params, grads, buffers, lr, momentum, wd, eta, eps, adapted):
    """Loop form of the reference: g += wd*w; g *= eta*|w|/(|g|+eps) if both norms > 0; SGD momentum."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g.double().clone()
        w = p.double()
        if adapted[i]:
            g = g + wd * w
            pn, gn = w.norm(), g.norm()
            if pn > 0 and gn > 0:
                g = g * (eta * pn / (gn + eps))
        buffers[i] = g if buffers[i] is None else momentum * buffers[i] + g
        p.data = (w - lr * buffers[i]).to(p.dtype)


def test_lars_matches_reference_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.zero_()  # a zero-norm parameter keeps ratio 1
    cfg = OptimConfig(weight_decay=1e-2, trust_coefficient=0.01, eps=1e-8, exclude_rule="norm_bias")
    opt = build_optimizer(model, cfg)
    ref_params = [p.detach().clone() for p in model.parameters()]
    excluded = excluded_parameter_names(model, "norm_bias")
    adapted = [name not in excluded for name, _ in model.named_parameters()]
    buffers = [None] * len(ref_params)
    for step in range(4):
        x = torch.randn(8, 6)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for group in opt.param_groups:
            group["lr"] = 0.3 + 0.1 * step
        opt.step()
        _reference_step(ref_params, grads, buffers, 0.3 + 0.1 * step, 0.9, 1e-2, 0.01, 1e-8, adapted)
        for got, ref in zip(model.parameters(), ref_params):
            torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-7)


def test_lars_trust_ratio_value():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    opt = build_optimizer(torch.nn.ParameterList([w]), OptimConfig(weight_decay=0.0, trust_coefficient=0.001))
    w.grad = torch.tensor([0.0, 2.0])  # |g| = 2 -> ratio 0.001 * 5 / 2 = 0.0025
    opt.param_groups[0]["lr"] = 1.0
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.005]))


def test_parameter_group_rules():
    model = build_model(ModelConfig(arch="resnet18", head_hidden=16, head_out=8))
    reference = excluded_parameter_names(model, "reference")
    correct = excluded_parameter_names(model, "norm_bias")
    assert "net.bn1.weight" in reference and "head1.bn1.weight" in reference and "head2.linear3.bias" in reference
    assert "net.layer2.0.downsample.1.weight" not in reference  # the reference rule's known miss
    assert "net.layer2.0.downsample.1.weight" in correct and "net.layer2.0.downsample.1.bias" in correct
    assert correct - reference == {"net.layer2.0.downsample.1.weight", "net.layer3.0.downsample.1.weight",
                                   "net.layer4.0.downsample.1.weight"}
    assert not any("conv" in n or n.endswith("linear1.weight") for n in correct)
    groups = parameter_groups(model, OptimConfig(exclude_rule="reference"))
    assert groups[0]["lars"] and groups[0]["weight_decay"] == 1e-6
    assert not groups[1]["lars"] and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_schedule_warmup_and_cosine():
    base, warm, total = 4.8, 100, 1000
    assert learning_rate(0, base, warm, total) == 0.0
    assert learning_rate(50, base, warm, total) == pytest.approx(2.4)
    assert learning_rate(100, base, warm, total) == pytest.approx(4.8)
    assert learning_rate(550, base, warm, total) == pytest.approx(2.4)
    t = 700
    assert learning_rate(t, base, warm, total) == pytest.approx(0.5 * base * (1 + math.cos(math.pi * 600 / 900)))
    assert learning_rate(1000, base, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(5, base, 0, 10) == pytest.approx(0.5 * base * (1 + math.cos(math.pi * 0.5)))


def test_base_lr_rule():
    from wcl_fast.optim import base_learning_rate

    assert base_learning_rate(OptimConfig(), 4096) == pytest.approx(4.8)
    assert base_learning_rate(OptimConfig(base_lr=0.3), 4096) == 0.3


def test_nonfinite_gradients_skip_the_step_without_touching_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = build_optimizer(model, OptimConfig(weight_decay=1e-3), skip_nonfinite=True)
    for group in opt.param_groups:
        group["lr"] = 0.5
    model(torch.randn(8, 4)).sum().backward()
    opt.step()  # a normal step fills the momentum buffers
    assert bool(opt.last_step_ok)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[2].bias.grad[0] = float("inf")
    opt.step()
    assert not bool(opt.last_step_ok)
    for p, b, p0, b0 in zip(model.parameters(), [opt.state[p]["momentum_buffer"] for p in model.parameters()], before, buffers):
        assert torch.equal(p.detach(), p0) and torch.equal(b, b0)


def test_guarded_step_equals_plain_step_on_finite_gradients():
    torch.manual_seed(1)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, OptimConfig(weight_decay=1e-2), skip_nonfinite=flag) for m, flag in zip(models, (False, True))]
    for step in range(3):
        x = torch.randn(8, 5)
        for m, o in zip(models, opts):
            for group in o.param_groups:
                group["lr"] = 0.2
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fused alpha vs separate multiply rounding


def test_apex_impl_without_apex_is_one_clear_error():
    from wcl_fast.config import ConfigError, OptimConfig
    from wcl_fast.optim import apex_available

    if apex_available():
        pytest.skip("apex is installed here")
    model = build_model(ModelConfig(arch="resnet18", head_hidden=16, head_out=8))
    with pytest.raises(ConfigError, match="optim.impl=apex needs NVIDIA apex.*optim.impl=native"):
        build_optimizer(model, OptimConfig(impl="apex"))


def test_apex_impl_matches_native_lars():
    from wcl_fast.config import OptimConfig
    from wcl_fast.optim import apex_available

    if not (apex_available() and torch.cuda.is_available()):
        pytest.skip("needs NVIDIA apex and CUDA")
    torch.manual_seed(0)
    native = build_model(ModelConfig(arch="resnet18", head_hidden=16, head_out=8)).cuda()
    fused = build_model(ModelConfig(arch="resnet18", head_hidden=16, head_out=8)).cuda()
    fused.load_state_dict(native.state_dict())
    opts = [build_optimizer(native, OptimConfig(weight_decay=1e-4)), build_optimizer(fused, OptimConfig(weight_decay=1e-4, impl="apex"))]
    x = torch.randn(8, 3, 32, 32, device="cuda")
    for step in range(3):
        for model, opt in zip((native, fused), opts):
            for group in opt.param_groups:
                group["lr"] = 0.5
            opt.zero_grad()
            model.net(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(native.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_zero_nonfinite_cleans_views_through_their_base_in_one_call():
    from wcl_fast.optim import zero_nonfinite_

    bucket = torch.randn(30)
    bucket[[3, 17]] = torch.tensor([float("nan"), float("-inf")])
    views = [bucket[:10].view(2, 5), bucket[10:24].view(7, 2), bucket[24:]]  # DDP-style bucket views
    loose = torch.tensor([1.0, float("inf"), -2.0])
    expected = torch.nan_to_num(bucket, 0.0, 0.0, 0.0)
    assert zero_nonfinite_(views + [loose]) == 2  # one call for the bucket, one for the loose gradient
    assert torch.equal(bucket, expected) and torch.equal(loose, torch.tensor([1.0, 0.0, -2.0]))
    assert torch.equal(views[0].flatten(), expected[:10])


def test_ddp_bucket_view_gradients_are_guarded_per_bucket(tmp_path):
    """2 gloo processes, DDP with gradient_as_bucket_view (the trainer's setting): a NaN on one rank
    skips the step on both (parameters and momentum untouched) with a few base-tensor cleanups."""
    from conftest import run_distributed

    run_distributed(_ddp_guard_worker, 2, tmp_path)


def _ddp_guard_worker(rank, world, tmp_path):
    import torch.distributed as dist

    import wcl_fast.optim as O

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = build_optimizer(model, OptimConfig(weight_decay=1e-3), skip_nonfinite=True)
    for group in opt.param_groups:
        group["lr"] = 0.3
    calls = []
    original = O.zero_nonfinite_
    O.zero_nonfinite_ = lambda grads: calls.append(original(grads)) or calls[-1]
    try:
        ddp(torch.randn(8, 6)).sum().backward()
        opt.step()
        assert bool(opt.last_step_ok)
        before = [p.detach().clone() for p in model.parameters()]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        opt.zero_grad()
        x = torch.randn(8, 6)
        if rank == 1:
            x[0, 0] = float("nan")  # the all-reduce spreads it to rank 0's gradients too
        ddp(x).sum().backward()
        opt.step()
        assert not bool(opt.last_step_ok)
        for p, p0, b0 in zip(model.parameters(), before, buffers):
            assert torch.equal(p.detach(), p0) and torch.equal(opt.state[p]["momentum_buffer"], b0)
        assert all(c < len(list(model.parameters())) for c in calls), calls  # per bucket, not per parameter
    finally:
        O.zero_nonfinite_ = original
    dist.barrier()
