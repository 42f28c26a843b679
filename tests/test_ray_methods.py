"""Each long-tail method on 2 Ray Train CPU workers (DDP on gloo), 2 smoke epochs: DDP must neither hang on
the heads a method leaves without gradient (uses_all_heads) nor lose the post-hoc scan's all_reduce.
Plain GLMC's 2-worker run is tests/test_ray_train.py's."""
import pytest
import ray

from glmc_ray.train import main
from tests.test_methods import SMOKE, TRAINED, check_method_run, run_settings


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=4, object_store_memory=256 << 20)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name,extra", [v for v, _ in TRAINED], ids=[i for _, i in TRAINED])
def test_each_method_trains_two_smoke_epochs_on_two_workers(name, extra, tmp_path):
    settings = run_settings(name, extra)
    assert main(["--config", str(SMOKE), "--workers", "2", "--output", str(tmp_path),
                 *[a for s in settings for a in ("--set", s)]]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    check_method_run(run, name, settings)
