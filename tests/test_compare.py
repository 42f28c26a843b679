"""python -m glmc_ray.compare: real runs trained in-process, compared locally and on a real S3 API server."""
import csv
import json
import statistics

import pyarrow.fs as pafs
import pytest

from glmc_ray.compare import main
from glmc_ray.runs import comparison
from glmc_ray.train import main as train_main
from tests.conftest import REPO
from tests.servers import make_bucket, s3_server

SMOKE = str(REPO / "configs/smoke.yaml")
SMALL = ["data.synthetic_max_count=64", "train.epochs=1", "model.width=4", "train.progress_every=0"]


def _train(output, *settings):
    before = set(output.iterdir()) if output.exists() else set()
    argv = ["--config", SMOKE, "--output", str(output)]
    for setting in (*SMALL, *settings):
        argv += ["--set", setting]
    assert train_main(argv) == 0
    (run,) = set(output.iterdir()) - before
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of CE and one of LDAM-DRW on the smoke data, a 2-epoch CE run, and a run of other data."""
    root = tmp_path_factory.mktemp("compare")
    made = {"ce": [_train(root / "exp", "name=ce", "method.name=ce", f"train.seed={seed}") for seed in (1, 2)],
            "ldam": [_train(root / "exp", "name=ldam", "method.name=ldam_drw")],
            "ce_long": [_train(root / "long", "name=ce", "method.name=ce", "train.epochs=2")],
            "other_data": [_train(root / "other", "name=ce", "method.name=ce", "data.imbalance_factor=20")]}
    return root, made


def _final(run):
    return json.loads((run / "final.json").read_text())


def _expected(runs, read):
    values = [read(_final(run)) for run in runs]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def test_compare_reproduces_the_final_json_files_it_reads(runs, tmp_path, capsys):
    root, made = runs
    out = tmp_path / "out"
    metrics = ["top1", "balanced_top1", "medium", "few", "minutes"]
    assert main([str(root / "exp"), "--output", str(out), "--metric", *metrics]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == {"ce", "ldam"} and groups["ce"]["seeds"] == 2
    assert sorted(groups["ce"]["runs"]) == sorted(str(r) for r in made["ce"])
    for name, key in (("ce", "top1"), ("ce", "balanced_top1"), ("ce", "medium"), ("ce", "few"), ("ldam", "top1")):
        mean, std = _expected(made[name], lambda f: f["last"]["test"][key])  # noqa: B023
        assert groups[name]["metrics"][key]["mean"] == pytest.approx(mean)
        assert groups[name]["metrics"][key]["std"] == (None if std is None else pytest.approx(std))
    seconds = [sum(json.loads(line)["train_seconds"] for line in (r / "metrics.jsonl").read_text().splitlines())
               for r in made["ce"]]
    assert groups["ce"]["metrics"]["minutes"]["mean"] == pytest.approx(statistics.mean(seconds) / 60)
    per_class = [statistics.mean(column) for column in zip(*(_final(r)["last"]["test"]["per_class"]
                                                            for r in made["ce"]), strict=True)]
    assert groups["ce"]["per_class"] == pytest.approx(per_class)
    mean, std = _expected(made["ce"], lambda f: f["last"]["test"]["top1"])
    assert f"| ce | 2 | {mean:.2f} ± {std:.2f} |" in table
    with open(out / "compare.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    assert float(rows["ce"]["top1_mean"]) == pytest.approx(mean) and rows["ldam"]["top1_std"] == ""
    for plot in ("per_class.png", "groups.png"):
        assert (out / plot).stat().st_size > 10_000, plot
    assert (out / "compare.md").read_text() == table[:table.index("compare.md, compare.csv")]


def test_grouping_by_method_or_config_keys_and_schedules_apart(runs, tmp_path, capsys):
    root, made = runs
    groups, notes = comparison.compare([str(root / "exp"), str(made["ce_long"][0])], "method")
    assert [(g.name, len(g.runs)) for g in groups] == [("ce (1 epochs)", 2), ("ce (2 epochs)", 1), ("ldam_drw", 1)]
    assert notes == ["note: ce: runs of 1, 2 epochs, compared apart"]
    groups, _ = comparison.compare([str(root / "exp")], "method.name,train.seed")
    assert sorted(g.name for g in groups) == ["method.name=ce, train.seed=1", "method.name=ce, train.seed=2",
                                              "method.name=ldam_drw, train.seed=3407"]


def test_bad_input_is_one_error_line(runs, tmp_path, capsys):
    root, made = runs
    (tmp_path / "empty").mkdir()
    cases = [([str(root / "exp"), str(root / "other")], "data.imbalance_factor is 10.0 in"),
             ([str(tmp_path / "missing")], "does not exist"),
             ([str(made["ce"][0] / "final.json")], "is a file; expected a run directory"),
             ([str(tmp_path / "empty")], "no finished run there"),
             ([str(root / "exp"), "--group-by", "optim.nosuch"], "--group-by optim.nosuch: not a config key")]
    for argv, words in cases:
        assert main([*argv, "--output", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
    assert not (tmp_path / "out").exists()


def test_compare_reads_runs_on_object_storage(runs, tmp_path, tmp_path_factory, capsys, monkeypatch):
    root, made = runs
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        make_bucket(env, "glmc")
        fs, _ = pafs.FileSystem.from_uri("s3://glmc/x")
        pafs.copy_files(str(root / "exp"), "glmc/exp", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        assert main(["s3://glmc/exp", "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    local, _ = comparison.compare([str(root / "exp")])
    assert {g["group"]: g["metrics"]["top1"]["mean"] for g in report["groups"]} == \
        {g.name: g.stats("top1")["mean"] for g in local}
    assert all(run.startswith("s3://glmc/exp/") for g in report["groups"] for run in g["runs"])
