"""Converter benchmark: `pipelines.convert` against a plain FFCV `DatasetWriter` over torchvision's
`ImageFolder` (the ffcv-imagenet way), side by side on the same folder, settings and workers.

    python -m pipelines.bench_convert [--data DIR|photos] [--count 2048] [--workers 2] [--repeats 3] [--json out.json]

Both write jpg records with the longest side capped at 512 and JPEG quality 90. After one untimed run
of each (imports, page cache), the two run `--repeats` times in alternating order (A B, B A, ...), so
neither always goes first; the table gives each one's median images/s and the ratio. Both write the
same bytes (tested): FFCV's encoder over images decoded once. wcl-fast decodes a complete
three-channel JPEG with OpenCV instead of PIL (the same pixels, less work per image: see
pipelines.images.decode_rgb_array) and does a little more once per conversion: the source scan with
its report, the watched writer workers, the atomic rename and the sidecar JSON. Without --data it
writes --count synthetic 500 x 375 JPEGs (--data photos: crops of real photographs); at a few hundred
images the writer's start-up, the same for both, is most of the time.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path



def plain_ffcv(src: str, out: str, workers: int, max_resolution: int = 512, jpeg_quality: int = 90) -> int:
    """The reference conversion: FFCV's DatasetWriter over torchvision's ImageFolder; returns the records."""
    from pipelines.ffcv import keep_torch_threads

    with keep_torch_threads():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(src)
    writer = DatasetWriter(out, {"image": RGBImageField(write_mode="jpg", max_resolution=max_resolution,
                                                        jpeg_quality=jpeg_quality),
                                 "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(dataset, chunksize=64)
    return len(dataset)


def main(argv=None) -> int:
    """The command (a user error: one line, exit 2). wcl_fast.cli, the commands' convention, is imported here
    only: the pipelines library itself imports nothing of wcl_fast but its config."""
    from wcl_fast.cli import command

    return command(_main)(argv)


def _main(argv=None) -> int:
    from wcl_fast.cli import ArgumentParser, at_least, output_file

    from pipelines.bench import write_bench_images, write_photo_images
    from pipelines.convert import convert

    parser = ArgumentParser(prog="python -m pipelines.bench_convert", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="ImageFolder, or 'photos' (default: synthetic JPEGs)")
    parser.add_argument("--count", type=at_least(1), default=2048, help="images of the built-in sets (without --data "
                        "or with --data photos)")
    parser.add_argument("--workers", type=at_least(1), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    output_file("--json", args.json)
    suffix = "" if args.count == 256 else f"_{args.count}"  # 256: the loader bench's sets
    if args.data is None:
        src = write_bench_images(Path("data") / f"bench_jpeg{suffix}", count=args.count)
    elif args.data == "photos":
        src = write_photo_images(Path("data") / f"bench_photos{suffix}", count=args.count)
    else:
        src = Path(args.data)
    ours, plain = "wcl-fast convert", "FFCV DatasetWriter + ImageFolder"
    times: dict[str, list[float]] = {ours: [], plain: []}
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        def once(name: str, label: str) -> float:
            nonlocal count
            start = time.perf_counter()
            if name == ours:
                count = convert(str(src), f"{tmp}/ours{label}.beton", 512, 90, "jpg", args.workers, quiet=True)["count"]
            else:
                plain_ffcv(str(src), f"{tmp}/plain{label}.beton", args.workers)
            return time.perf_counter() - start

        once(ours, "warm")
        once(plain, "warm")
        for repeat in range(args.repeats):
            for name in ((ours, plain) if repeat % 2 == 0 else (plain, ours)):
                times[name].append(once(name, str(repeat)))
    rows = {name: {"median_s": statistics.median(t), "images_per_s": count / statistics.median(t), "runs_s": t}
            for name, t in times.items()}
    ratio = rows[ours]["images_per_s"] / rows[plain]["images_per_s"]
    print(f"{count} images from {src}, {args.workers} workers, jpg, max resolution 512, quality 90, "
          f"median of {args.repeats} runs each in alternating order after one warm-up run each")
    print(f"{'converter':<36}{'images/s':>10}{'median s':>10}")
    for name, row in rows.items():
        print(f"{name:<36}{row['images_per_s']:>10.1f}{row['median_s']:>10.2f}")
    print(f"wcl-fast / plain FFCV: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"count": count, "workers": args.workers, "rows": rows, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
