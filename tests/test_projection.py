"""benchmarks/project_imagenet.py: the GPU-hours projection against a hand computation."""


def test_imagenet_projection_by_hand():
    """benchmarks/project_imagenet.py: the GPU-hours arithmetic on numbers small enough to do by hand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "project_imagenet.py"
    spec = importlib.util.spec_from_file_location("project_imagenet", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.project(n=360_000, epochs=10, warmup=2, every=4, fraction=0.1, images_per_s=100, round_s=1800,
                    loader_images_per_s=None, overlap_cost=1.0)
    # full: 10 x 360k / 100 / 3600 = 10 h; RCS: (2 x 360k + 8 x 36k) / 100 / 3600 = 2.8 h + rounds at 2, 6: 1 h
    assert (r["full_data_gpu_h"], r["rcs_training_gpu_h"], r["rcs_rounds"], r["rcs_selection_gpu_h"]) == (10.0, 2.8, 2, 1.0)
    assert r["speedup"] == round(10 / 3.8, 2)
    slow_loader = mod.project(360_000, 10, 2, 4, 0.1, 100, 1800, 50, 0.0)
    assert slow_loader["full_data_gpu_h"] == 20.0 and slow_loader["loader_bound"] and slow_loader["rcs_selection_gpu_h"] == 0
