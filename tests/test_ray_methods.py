"""Each long-tail method on 2 Ray Train CPU workers (DDP on gloo), 2 smoke epochs: DDP must neither hang on
the heads a method leaves without gradient (uses_all_heads) nor lose the post-hoc scan's all_reduce; a second
stage from an in-process parent, and the APA model, on 2 workers too (one Ray session for all: it costs ~8 s).
Plain GLMC's 2-worker run is tests/test_ray_train.py's.

The methods' runs are independent, so they train CONCURRENT at a time from one driver (a run is mostly
process start-up and waiting: 9 one after the other took 172 s); each test then checks its own run."""
import concurrent.futures
import json

import pytest
import ray

from glmc_ray.runs import rundir
from glmc_ray.train import main
from tests.test_activations import APA_RUN
from tests.test_deit_lt import STUDENT, TEACHER
from tests.test_experts import STAGE1
from tests.test_methods import SMOKE, TRAINED, check_method_run, run_settings


def _sets(settings):
    return [a for s in settings for a in ("--set", s)]


CONCURRENT = 3  # 2-worker runs at once: 6 logical CPUs, about 9 GB of memory at their peak


@pytest.fixture(scope="module", autouse=True)
def ray_session(shared_ray):
    assert ray.cluster_resources()["CPU"] >= 2 * CONCURRENT


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """label -> (exit code, output folder) of every method's 2-epoch, 2-worker run, trained concurrently."""
    runs = tmp_path_factory.mktemp("methods")

    def train(label, name, extra):
        output = runs / label
        output.mkdir()
        return main(["--config", str(SMOKE), "--workers", "2", "--output", str(output),
                     *_sets(run_settings(name, extra))]), output

    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        futures = {label: pool.submit(train, label, *variant) for variant, label in TRAINED}
        return {label: future.result() for label, future in futures.items()}


@pytest.mark.parametrize("name,extra", [v for v, _ in TRAINED], ids=[i for _, i in TRAINED])
def test_each_method_trains_two_smoke_epochs_on_two_workers(name, extra, method_runs, request):
    code, output = method_runs[request.node.callspec.id]
    assert code == 0
    (run,) = [p for p in output.iterdir() if p.is_dir()]
    check_method_run(run, name, run_settings(name, extra))


def test_stage_two_on_two_ray_workers_from_an_in_process_parent(tmp_path):
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "one"), *_sets(STAGE1)]) == 0
    (parent,) = (tmp_path / "one").iterdir()
    stage2 = [*STAGE1, "method.shike.stage=retrain", f"train.init_from={parent}"]
    assert main(["--config", str(SMOKE), "--workers", "2", "--output", str(tmp_path / "two"), *_sets(stage2)]) == 0
    (run,) = [p for p in (tmp_path / "two").iterdir() if p.is_dir()]
    assert json.loads((run / "parent.json").read_text())["checkpoint"] == str(parent / "checkpoint.pt")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_apa_trains_on_two_ray_workers(tmp_path):
    sets = _sets([*APA_RUN, "model.norm=group", "model.aglu_gradient=official"])
    assert main(["--config", str(SMOKE), "--workers", "2", "--output", str(tmp_path), *sets]) == 0
    (run,) = tmp_path.iterdir()
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]


def test_a_deit_lt_student_on_two_workers_learns_from_an_in_process_teacher_run(tmp_path):
    """Each worker loads the teacher outside its DDP model; the two heads are scored one by one."""
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "teacher"), *_sets(TEACHER)]) == 0
    (teacher,) = (tmp_path / "teacher").iterdir()
    student = [*STUDENT, f"method.deit_lt.teacher={teacher}"]
    assert main(["--config", str(SMOKE), "--workers", "2", "--output", str(tmp_path / "student"),
                 *_sets(student)]) == 0
    (run,) = (tmp_path / "student").iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["drw"] for r in records] == [0.0, 1.0]
    assert all(0 <= r[f"test_{head}_top1"] <= 100 for r in records for head in ("cls", "dist"))
    final = json.loads((run / "final.json").read_text())
    assert final["workers"]["count"] == 2 and final["last"]["test"]["expert_names"] == ["cls", "dist"]
