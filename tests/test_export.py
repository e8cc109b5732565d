"""Encoder export to torchvision and import of the official WCL checkpoint layout."""
import pytest
import torch
import torchvision

from wcl_fast.config import ModelConfig
from wcl_fast.export import encoder_state_dict, import_official, main
from wcl_fast.model import build_model


def _trained_like_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", head_hidden=32, head_out=16))
    with torch.no_grad():  # non-trivial BN statistics and weights
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_export_round_trip_gives_identical_features(tmp_path):
    model = _trained_like_model()
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {"stem": "imagenet"}}}, checkpoint)
    out = tmp_path / "resnet18.pth"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(torch.load(out), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tv(x), model.net(x))


def test_official_layout_imports_and_gives_the_same_features(tmp_path):
    model = _trained_like_model()
    official = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": {}, "epoch": 200}
    path = tmp_path / "wcl-200.pth"
    torch.save(official, path)
    out = tmp_path / "converted.pt"
    assert main(["--official", str(path), "--out", str(out)]) == 0
    fresh = build_model(ModelConfig(arch="resnet18", head_hidden=32, head_out=16))
    fresh.load_state_dict(torch.load(out)["model"])  # strict: every key maps
    fresh.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh(x, None)[:2], model(x, None)[:2]))


def test_bad_inputs_are_clear(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not the official WCL layout"):
        import_official({"model": {"encoder.conv1.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"net\.\*"):
        encoder_state_dict({"head1.linear1.weight": torch.zeros(1)})


def _exported(tmp_path, fmt, out_name, arch="resnet18"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, head_hidden=32, head_out=16))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {"stem": "imagenet"}}}, checkpoint)
    out = tmp_path / out_name
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--format", fmt]) == 0
    return model.eval(), out


def test_timm_loads_the_export_strictly_and_pools_the_same_features(tmp_path):
    timm = pytest.importorskip("timm")
    model, out = _exported(tmp_path, "timm", "resnet50_timm.pth", arch="resnet50")
    net = timm.create_model("resnet50", num_classes=0, pretrained=False)
    net.load_state_dict(torch.load(out))  # strict: every tensor named as timm names it
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.net(x), rtol=0, atol=1e-5)


def _detectron2_resnet_names(depth: int) -> dict:
    """The tensor names and shapes detectron2's ResNet backbone (detectron2/modeling/backbone/resnet.py,
    build_resnet_backbone with RESNETS.DEPTH = depth, NORM = FrozenBN, RES2_OUT_CHANNELS 64 for R18 /
    256 for R50) registers, written down from its module structure: BasicStem.conv1 (a Conv2d with its norm
    as .norm), stages res2..res5 of BasicBlock (conv1, conv2) or BottleneckBlock (conv1, conv2, conv3), a
    .shortcut convolution (with .norm) on each stage's first block, and FrozenBatchNorm2d's four buffers."""
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    norm = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight": (64, 3, 7, 7), **{f"stem.conv1.norm.{n}": (64,) for n in norm}}
    in_ch = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2 ** stage
        out_ch = width * (4 if depth == 50 else 1)
        for b in range(count):
            prefix = f"res{stage + 2}.{b}"
            if depth == 50:
                convs = [("conv1", (width, in_ch, 1, 1)), ("conv2", (width, width, 3, 3)), ("conv3", (out_ch, width, 1, 1))]
            else:
                convs = [("conv1", (out_ch, in_ch, 3, 3)), ("conv2", (out_ch, out_ch, 3, 3))]
            if b == 0 and (in_ch != out_ch or stage > 0):
                convs.append(("shortcut", (out_ch, in_ch, 1, 1)))
            for conv, shape in convs:
                names[f"{prefix}.{conv}.weight"] = shape
                names.update({f"{prefix}.{conv}.norm.{n}": (shape[0],) for n in norm})
            in_ch = out_ch
    return names


@pytest.mark.parametrize("arch,depth", [("resnet18", 18), ("resnet50", 50)])
def test_detectron2_export_has_detectron2s_names_shapes_and_values(tmp_path, arch, depth):
    import pickle

    from wcl_fast.export import detectron2_key

    model, out = _exported(tmp_path, "detectron2", "weights.pkl", arch=arch)
    with open(out, "rb") as handle:
        data = pickle.load(handle, encoding="latin1")  # as detectron2's checkpointer opens a .pkl
    assert data["matching_heuristics"] is True and set(data) == {"model", "__author__", "matching_heuristics"}
    expected = _detectron2_resnet_names(depth)
    assert {k: tuple(v.shape) for k, v in data["model"].items()} == expected
    for key, value in model.net.state_dict().items():
        name = detectron2_key(key)
        if name is not None:
            assert (data["model"][name] == value.numpy()).all(), key
    assert main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "w.pth"),
                 "--format", "detectron2"]) == 2
