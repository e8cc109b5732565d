"""Parts of the built-in demo and the comparison: the narrow small-image ResNet, head 2's own
temperature, the raw-pixel kNN floor, and the training-curve plot."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import naive
from conftest import normalized
from wcl_fast.config import ConfigError, ModelConfig, load_config
from wcl_fast.model import build_encoder, build_model

ROOT = Path(__file__).resolve().parent.parent


def test_stage_widths_build_a_narrow_resnet_with_torchvision_keys():
    narrow = build_encoder("resnet18", "small", [16, 32, 64, 128])
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Identity()
    ours, theirs = narrow.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)  # same names, so export and the linear probe read it
    assert ours["conv1.weight"].shape == (16, 3, 3, 3) and ours["layer4.1.conv2.weight"].shape == (128, 128, 3, 3)
    assert ours["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    params = sum(p.numel() for p in narrow.parameters())
    assert 0.65e6 < params < 0.75e6, params  # 0.7 M: 1/16 of ResNet-18's 11.2 M (widths / 4)
    torch.manual_seed(0)
    out = narrow.eval()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 128)
    # torchvision's initialisation: Kaiming fan_out normal convs (std sqrt(2 / (k*k*out))), BN 1 / 0
    conv = ours["layer3.1.conv1.weight"]
    assert conv.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.1)
    assert torch.all(ours["layer3.1.bn1.weight"] == 1) and torch.all(ours["layer3.1.bn1.bias"] == 0)
    model = build_model(ModelConfig(arch="resnet18", stem="small", widths=[16, 32, 64, 128], head_hidden=32, head_out=8))
    assert model.head1.linear1.in_features == 128
    wide = build_encoder("resnet50", "imagenet", [8, 16, 32, 64])
    assert wide(torch.randn(2, 3, 64, 64)).shape == (2, 256)  # bottleneck expansion 4


@pytest.mark.parametrize("widths", ["[16, 32, 64]", "[16, 0, 64, 128]"])
def test_bad_widths_name_the_key(widths):
    with pytest.raises(ConfigError, match="model.widths"):
        load_config(None, [f"model.widths={widths}"])


def test_graph_tau_sets_head_2_temperature_only():
    from wcl_fast.objectives.wcl import wcl_loss_terms

    n, d = 12, 8
    z1, z2, u1, u2 = (normalized(n, d, seed=s + 90) for s in range(4))
    z_local, u_local = normalized(2 * n, d, seed=95), normalized(2 * n, d, seed=96)
    terms = wcl_loss_terms(z1, z2, u1, u2, z1, z2, u1, u2, tau=0.2, z_local=z_local, u_local=u_local, graph_tau=0.1)
    arrays = [t.numpy() for t in (z1, z2, u1, u2)]
    nce_02, _ = naive.wcl_terms(*arrays, tau=0.2, z_local=z_local.numpy(), u_local=u_local.numpy())
    _, graph_01 = naive.wcl_terms(*arrays, tau=0.1, z_local=z_local.numpy(), u_local=u_local.numpy())
    assert terms.nce.item() == pytest.approx(nce_02, rel=1e-5)
    assert terms.graph.item() == pytest.approx(graph_01, rel=1e-5)


def test_graph_tau_on_the_knn_rule_path():
    from wcl_fast.objectives.wcl import compute_loss

    n, crops, d = 6, 2, 8
    z1, z2, u1, u2 = (normalized(n, d, seed=s + 120) for s in range(4))
    z_local, u_local = normalized(crops * n, d, seed=130), normalized(crops * n, d, seed=131)
    cfg = load_config(None, ["loss.tau=0.2", "loss.graph_tau=0.1", "loss.multicrop_rule=knn",
                             "loss.similarity_backend=torch"])
    terms = compute_loss(cfg, torch.cat([z1, z2]), torch.cat([u1, u2]), z_local, u_local, rank=0)
    arrays = [t.numpy() for t in (z1, z2, u1, u2, z_local, u_local)]
    nce_02, _, _ = naive.knn_rule_terms(*arrays, tau=0.2)
    _, graph_01, _ = naive.knn_rule_terms(*arrays, tau=0.1)
    assert terms.nce.item() == pytest.approx(nce_02, rel=1e-5)
    assert terms.graph.item() == pytest.approx(graph_01, rel=1e-5)


def _digit_folders(root: Path, per_class=(12, 5), size=20, seed=0):
    """3 classes of noisy strokes (grey JPEGs, class = stroke orientation), train and test folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for label in range(3):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.normal(40, 20, (size, size))
                pos = int(rng.integers(4, size - 4))
                if label == 0:
                    img[pos - 1:pos + 2, :] = 230
                elif label == 1:
                    img[:, pos - 1:pos + 2] = 230
                else:
                    np.fill_diagonal(img, 230)
                Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root


def test_raw_pixel_knn_matches_a_float64_reference(tmp_path):
    from PIL import Image

    from wcl_fast.demo import raw_pixel_knn

    root = _digit_folders(tmp_path)
    mean, std = 0.2, 0.3
    cfg = load_config(None, ["data.backend=reference", f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'test'}",
                             "data.eval_resize=20", "data.eval_crop=20", "data.workers=0", "knn.k=7", "knn.temperature=0.1",
                             f"data.mean=[{mean}, {mean}, {mean}]", f"data.std=[{std}, {std}, {std}]"])
    result = raw_pixel_knn(cfg, torch.device("cpu"))

    def load(split):
        feats, labels = [], []
        for label in range(3):
            for path in sorted((root / split / str(label)).iterdir()):
                pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
                x = ((pixels - mean) / std).transpose(2, 0, 1).ravel()
                feats.append(x / np.linalg.norm(x))
                labels.append(label)
        return np.array(feats), np.array(labels)

    bank, bank_labels = load("train")
    test, test_labels = load("test")
    correct = 0
    for x, y in zip(test, test_labels):  # weighted kNN, one test image at a time
        sims = bank @ x
        top = np.argsort(-sims, kind="stable")[:7]
        votes = np.zeros(3)
        for j in top:
            votes[bank_labels[j]] += np.exp(sims[j] / 0.1)
        correct += int(np.argmax(votes) == y)
    assert result["count"] == 15
    assert result["top1"] == pytest.approx(100.0 * correct / 15)
    assert 40 < result["top1"] <= 100  # the strokes are separable from pixels


def test_plot_draws_every_panel_and_overlays_runs(tmp_path, capsys):
    from PIL import Image

    from wcl_fast.plot import loss_terms, main, read_log

    runs = []
    for r, scale in enumerate((1.0, 0.5)):
        run = tmp_path / f"run{r}"
        run.mkdir()
        records = [{"step": 0, "loader": "reference", "loader_reason": "x"}]
        records += [{"step": s, "loss": 5 * scale / s, "nce": 3 / s, "graph": 2 / s, "lr": 0.1 * s, "epoch": 0,
                     "samples_per_s": 100.0 + s, "data_wait": 0.05, "failed_images": 0, "skipped_steps": 0}
                    for s in range(1, 11)]
        records += [{"step": 10, "replica_divergence": 0.0}, {"step": 10, "knn_top1": 80.0 + r, "knn_top5": 99.0}]
        records += [{"step": 5, "loss": 9.0, "nce": 3 / 5, "graph": 2 / 5, "lr": 0.5, "epoch": 0,  # resumed: repeats step 5
                     "samples_per_s": 1.0, "data_wait": 0.0, "failed_images": 0, "skipped_steps": 0}]
        (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
        runs.append(str(run))
    log = read_log(runs[0])
    interval = [x for x in log if "loss" in x]
    assert [x["step"] for x in interval] == list(range(1, 11)) and interval[4]["loss"] == 9.0  # last record wins
    assert loss_terms(log) == ["loss", "nce", "graph"]
    out = tmp_path / "curves.png"
    assert main([*runs, "--out", str(out), "--labels", "a,b"]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 4 * img.height / 2  # five panels side by side
        pixels = np.asarray(img.convert("RGB"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # matplotlib's C0 and C1: both runs drawn
    assert main([str(tmp_path / "missing")]) == 2
    assert "log.jsonl does not exist" in capsys.readouterr().err
    assert main([*runs, "--labels", "only-one"]) == 2
