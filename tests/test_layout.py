"""The layering the code promises: the pipelines library imports nothing of wcl_fast but its config, and the
objectives import neither loaders nor evaluation code (the trainer hands them what they need)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_pipelines_import_only_the_config_of_wcl_fast():
    loaded = _modules_after("import pipelines, pipelines.reference, pipelines.pil, pipelines.images, pipelines.sampling, pipelines.batch, "
                            "pipelines.datasets, pipelines.synthetic, pipelines.augment, pipelines.cpu_augment, "
                            "pipelines.crop_params, pipelines.keyed_random, pipelines.dali, pipelines.ffcv, "
                            "pipelines.convert, pipelines.bench, pipelines.bench_convert, pipelines.augment_triton, pipelines.bench_augment, pipelines.shards, pipelines.wds_write, pipelines.dali_shards")
    assert {m for m in loaded if m.startswith("wcl_fast")} == {"wcl_fast", "wcl_fast.config"}


def test_objectives_import_no_loaders_or_evaluation_code():
    loaded = _modules_after("import wcl_fast.objectives")
    assert not {m for m in loaded if m.startswith("pipelines")}
    assert not loaded & {"wcl_fast.knn", "wcl_fast.linear", "wcl_fast.finetune", "wcl_fast.evaluation", "wcl_fast.train"}
