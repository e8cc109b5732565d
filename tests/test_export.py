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
