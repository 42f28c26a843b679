"""The hyper-parameter search: space validation (no Ray), then real Ray Tune + real Optuna on CPU trials."""
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import ray
import yaml

from glmc_ray.core import config as config_lib
from glmc_ray.core.errors import STORAGE_LOST
from glmc_ray.runs import rundir
from glmc_ray.search import console, objectives, space_file, trials
from glmc_ray.search import full as search_full
from glmc_ray.search import options as search_options
from glmc_ray.search import space as search_space
from glmc_ray.train import main as train_main
from tests.conftest import REPO, assert_quiet, git_head
from tests.servers import CuttableProxy, postgres_server
from tuning.search import main

SMOKE = str(REPO / "configs/smoke.yaml")
METHODS_SPACE = REPO / "configs/search/methods.yaml"
FAST = ["--set", "data.synthetic_max_count=64", "--set", "data.synthetic_test_per_class=10"]


@pytest.fixture(scope="module")
def ray_session(shared_ray):
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"  # read by Tune in this process
    return shared_ray


def _space(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows(experiment):
    with open(experiment / "trials.csv") as f:
        return list(csv.DictReader(f))


def _only_experiment(output):
    found = [p for p in output.iterdir() if p.is_dir() and "-search-" in p.name]
    assert len(found) == 1
    return found[0]


def _study(experiment, url=None):
    return optuna.load_study(study_name=experiment.name, storage=url or f"sqlite:///{experiment / 'study.db'}")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


# ------------------------------------------------------------------------------------- (a) no Ray

@pytest.mark.parametrize("text, key, words", [
    ("optim.lrr: {float: [0.01, 0.1]}", "optim.lrr", "unknown key"),
    ("method.glmc.cumulative_exponent: {float: [1, two]}", "method.glmc.cumulative_exponent", "not a number"),
    ("train.epochs: {float: [1, 3]}", "train.epochs", "expected int"),
    ("method.glmc.area_corrected_cutmix: {choice: [0, 1]}", "method.glmc.area_corrected_cutmix", "true or false"),
    ("optim.lr: {float: [-1, 0.1]}", "optim.lr", "out of range"),
    ("optim.momentum: {float: [0.5, 1.5]}", "optim.momentum", "out of range"),
    ("method.glmc.cumulative_shape: {choice: [power, square]}", "method.glmc.cumulative_shape", "not one of"),
    ("optim.lr: {float: [0.1, 0.01]}", "optim.lr", "empty range"),
    ("optim.lr: {float: [0.05, 0.05]}", "optim.lr", "empty range"),
    ("method.glmc.cumulative_shape: {choice: []}", "method.glmc.cumulative_shape", "empty range"),
    ("optim.lr: {float: [0.0, 0.1], log: true}", "optim.lr", "out of range"),
    ("optim.lr: 0.1", "optim.lr", "expected one of"),
    ("optim: {float: [0.1, 1]}", "optim", "dotted config field"),
    ("optim.lr: {float: [0.1, 1]}", "optim.lr", "base config's value 0.05 is outside"),
])
def test_space_errors_name_the_file_and_the_key(tmp_path, text, key, words):
    path, err = _space_error(tmp_path, text)
    assert str(err).startswith(f"{path}: {key}") and words in str(err), str(err)
    assert err.key == key


def _space_error(tmp_path, text) -> tuple:
    """The space file written from `text`, and the ConfigError that loading it over the smoke config raises."""
    path = _space(tmp_path, text)
    with pytest.raises(config_lib.ConfigError) as err:
        space_file.load_space(path, config_lib.load(SMOKE))
    return path, err.value


COND = "method.name: {choice: [glmc, ldam_drw, ce]}\nwhen:\n"


@pytest.mark.parametrize("text, start, words", [
    (COND + "  method.name=class_balanced: {}", "when: method.name=class_balanced", "not one of method.name's choices"),
    ("optim.lr: {float: [0.01, 0.1]}\nwhen:\n  optim.lr=0.05: {}", "when: optim.lr=0.05", "not searched as a {choice"),
    (COND + "  method.glmc.cumulative_shape=power: {}", "when: method.glmc.cumulative_shape=power",
     "not searched as a {choice"),
    (COND + "  method.name: {}", "when: method.name", "expected KEY=VALUE"),
    ("method.name: {choice: [glmc, ce]}\nwhen: [method.name=ce]", "when", "expected a mapping"),
    (COND + "  method.name=ldam_drw: [method.ldam_drw.scale]", "when: method.name=ldam_drw", "expected the fields"),
    (COND + "  method.name=ldam_drw: {method.ldam_drw.scale: {float: [10, 500]}}",
     "method.ldam_drw.scale (when method.name=ldam_drw)", "out of range"),
    (COND + "  method.name=ldam_drw: {method.ldam_drw.scale: {float: [50, 10]}}",
     "method.ldam_drw.scale (when method.name=ldam_drw)", "empty range"),
    (COND + "  method.name=glmc: {method.ldam_drw.scale: {float: [10, 50]}}",
     "method.ldam_drw.scale (when method.name=glmc)", "move it under when: method.name=ldam_drw:"),
    ("method.name: {choice: [glmc, ce]}\nmethod.glmc.mix_beta: {float: [0.2, 4]}", "method.glmc.mix_beta",
     "search it under when: method.name=glmc:"),
    (COND + "  method.name=glmc:\n    method.glmc.cumulative_shape: {choice: [power, linear]}\n    when:\n"
     "      method.glmc.cumulative_shape=power: {method.glmc.cumulative_exponent: {float: [0, 4]}}",
     "method.glmc.cumulative_exponent (when method.name=glmc, method.glmc.cumulative_shape=power)", "out of range"),
    (COND + "  method.name=glmc:\n    when:\n      method.name=ce: {}", "when: method.name=ce", "already glmc"),
    ("method.name: {choice: [glmc, ce]}\noptim.nesterov: {choice: [true, false]}\nwhen:\n"
     "  method.name=ce: {optim.lr: {float: [0.01, 0.1]}}\n  optim.nesterov=false: {optim.lr: {float: [0.01, 0.1]}}",
     "optim.lr (when optim.nesterov=false)", "searched twice"),
    ("optim.lr: {float: [0.005, 0.1]}\n" + COND + "  method.name=ce: {optim.lr: {float: [0.02, 0.2]}}",
     "optim.lr (when method.name=ce)", "so method.name must come before optim.lr"),
    (COND + "  method.name=ce: {optim.lr: {fixed: 0.5, log: true}}", "optim.lr (when method.name=ce)",
     "unknown option(s) log"),
    ("optim.lr: {fixed: 0.05}", "optim.lr", "use --set optim.lr=..."),
    (COND + "  method.name=ce: {model.arch: {fixed: vit_huge}}", "model.arch (when method.name=ce)",
     "value 'vit_huge'"),
    ("method.name: {choice: [ce, ldam_drw]}\nwhen:\n  method.name=ldam_drw: {}", "method.name",
     "base config's value 'glmc' is outside"),
])
def test_conditional_space_errors_name_the_file_and_the_key(tmp_path, text, start, words):
    path, err = _space_error(tmp_path, text)
    assert str(err).startswith(f"{path}: {start}") and words in str(err), str(err)


def test_methods_space_samples_only_the_chosen_method_s_knobs():
    """Define-by-run sampling of configs/search/methods.yaml (Optuna, no Ray): each trial holds exactly the
    fields its choices search, and its config has only its method's section."""
    base = config_lib.load(SMOKE, ["method.glmc.maxnorm_threshold=0.1"])  # a GLMC setting the space leaves alone
    space = space_file.load_space(METHODS_SPACE, base)
    assert search_space.Space.from_json(json.loads(json.dumps(space.to_json()))) == space  # search.json round trip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    methods = set()
    for _ in range(40):
        trial = study.ask()
        space(trial)
        params, method = trial.params, trial.params["method.name"]
        methods.add(method)
        assert all(key.split(".")[1] in ("name", method) for key in params if key.startswith("method.")), params
        assert ("method.glmc.cumulative_exponent" in params) == (params.get("method.glmc.cumulative_shape") == "power")
        assert space.active(params) == params
        cfg = search_options.trial_config(base, params, 1)
        assert set(config_lib.to_dict(cfg)["method"]) <= {"name", method}
        assert all(search_space.get_dotted(cfg, key) == value for key, value in params.items())
        if method == "glmc":  # the base's method: its section is the base's, with the sampled knobs
            assert cfg.method.glmc.maxnorm_threshold == 0.1
    assert methods == set(config_lib.METHOD_NAMES) - {"deit_lt"}  # it needs a teacher run and a DeiT, not in this space
    # the full-schedule runs take a trial's searched fields only (trials.csv's empty cells are None)
    row = {"trial_id": "t", **dict.fromkeys(space.keys()), **space.point(base)}
    assert search_full.full_job(row, space, base, 0) == search_full.FullRun(search_full.RECIPE, space.point(base), 0)
    row.update({"method.name": "ldam_drw", "method.ldam_drw.max_margin": 0.3, "method.ldam_drw.scale": 20.0,
                "method.ldam_drw.drw_start": 0.6})
    job = search_full.full_job(row, space, base, 0)
    assert job.label == "t" and set(job.values) == {"method.name", "optim.lr", "optim.weight_decay",
                                                    "method.ldam_drw.max_margin", "method.ldam_drw.scale",
                                                    "method.ldam_drw.drw_start"}


def test_a_take_over_leaves_the_outer_field_checked_with_the_other_choices(tmp_path):
    """ce's branch takes optim.warmup_epochs over; in glmc's trials the outer range still meets the schedule
    choice, so warm-up 1 with the cosine schedule (no warm-up) is an error before any trial."""
    text = ("method.name: {choice: [glmc, ce]}\noptim.schedule: {choice: [warmup_cosine, cosine]}\n"
            "optim.warmup_epochs: {int: [0, 1]}\nwhen:\n  method.name=ce: {optim.warmup_epochs: {fixed: 0}}")
    base = config_lib.load(SMOKE, ["optim.schedule=warmup_cosine", "optim.warmup_epochs=0"])
    with pytest.raises(config_lib.ConfigError, match=r"optim.warmup_epochs: value 1 with optim.schedule=cosine"):
        space_file.load_space(_space(tmp_path, text), base)


def test_a_branch_fixes_fields_and_takes_over_a_field_searched_above(tmp_path):
    """when: method.name=ce fixes nesterov and searches its own lr: ce's trials take both, the others the outer
    lr; Optuna sees the sampled fields only, Tune's config also the fixed ones (the space's return value)."""
    text = ("method.name: {choice: [glmc, ce]}\noptim.lr: {float: [0.01, 0.1]}\nwhen:\n"
            "  method.name=ce: {optim.nesterov: {fixed: false}, optim.lr: {float: [0.2, 0.8]}}")
    base = config_lib.load(SMOKE)
    space = space_file.load_space(_space(tmp_path, text), base)
    assert space.keys() == ["method.name", "optim.lr", "optim.nesterov"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        constants = space(trial)
        method, lr = trial.params["method.name"], trial.params["optim.lr"]
        seen.add(method)
        assert set(trial.params) == {"method.name", "optim.lr"}
        assert (0.2 <= lr <= 0.8) if method == "ce" else (0.01 <= lr <= 0.1)
        assert constants == ({"optim.nesterov": False} if method == "ce" else {})
        cfg = search_options.trial_config(base, {**trial.params, **constants}, 1)
        assert cfg.optim.lr == lr and cfg.optim.nesterov == (method != "ce" and base.optim.nesterov)
        assert space.active({**trial.params, **constants}) == {**trial.params, **constants}
    assert seen == {"glmc", "ce"}
    assert space.point(base, sampled_only=True) == {"method.name": "glmc", "optim.lr": base.optim.lr}


def test_methods_space_searches_deit_lt_only_given_a_teacher_run(capsys):
    """configs/search/methods.yaml: without a teacher deit_lt is left out (a note says so); with one, its trials
    train the CPU-size DeiT with AdamW at its own lr range, label smoothing 0.1 and that teacher."""
    base = config_lib.load(SMOKE)
    without = space_file.load_space(METHODS_SPACE, base)
    assert "deit_lt" not in without.params[0].choices and "model.arch" not in without.keys()
    note = capsys.readouterr().err
    assert note.startswith("note: ") and "deit_lt left out of method.name's choices" in note and "--teacher RUN" in note
    space = space_file.load_space(METHODS_SPACE, base, "/runs/teacher")
    assert "deit_lt" in space.params[0].choices
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    lrs = {}
    for _ in range(60):
        trial = study.ask()
        constants = space(trial)
        method = trial.params["method.name"]
        lrs.setdefault(method == "deit_lt", []).append(trial.params["optim.lr"])
        cfg = search_options.trial_config(base, {**trial.params, **constants}, 1)
        if method == "deit_lt":
            assert (cfg.model.arch, cfg.optim.name, cfg.train.label_smoothing) == ("deit_micro_distilled_patch4_32",
                                                                                  "adamw", 0.1)
            assert cfg.method.deit_lt.teacher == "/runs/teacher" and "model.arch" not in trial.params
        else:
            assert (cfg.model.arch, cfg.optim.name, cfg.train.label_smoothing) == (base.model.arch, "sgd", 0.0)
    assert max(lrs[True]) <= 1e-3 and min(lrs[False]) >= 0.003
    with pytest.raises(config_lib.ConfigError, match=r"--teacher /runs/teacher: no method the space .* can choose"):
        space_file.load_space(REPO / "configs/search/glmc.yaml", base, "/runs/teacher")


def test_objectives_read_the_validation_record_and_mix_with_weights():
    record = {"val_balanced_top1": 40.0, "val_top1": 55.0, "val_few": 10.0, "val_worst": 2.0, "val_many": None}
    plain, mixed, worst = objectives.parse(["balanced_top1", "0.7*balanced_top1+0.3*few", "worst"], "--pareto")
    assert (plain.key, mixed.key, worst.key) == ("val_balanced_top1", "objective_2", "val_worst")
    assert plain.value(record) == 40.0 and mixed.value(record) == pytest.approx(0.7 * 40 + 0.3 * 10)
    assert objectives.parse(["many"])[0].value(record) is None  # no Many class: no objective
    assert objectives.with_values(record, (plain, mixed))["objective_2"] == pytest.approx(31.0)
    for specs, words in ((["recall"], "'recall' is not an objective"), (["0.5*few+x"], "'x' is not an objective"),
                         (["few", "1*few"], "few is given twice"), (["2**few"], "'2**few' is not")):
        with pytest.raises(config_lib.ConfigError, match=re.escape(words)):
            objectives.parse(specs)


def test_the_pareto_front_holds_exactly_the_non_dominated_trials():
    import random

    generator = random.Random(0)
    rows = [{"number": n, "status": "complete" if n % 7 else "failed", "a": generator.random(),
             "b": generator.random()} for n in range(1, 60)]
    rows += [{**rows[0], "number": 60}]  # a tie with trial 1: neither dominates the other
    front = objectives.pareto_front(rows, ["a", "b"])
    done = [r for r in rows if r["status"] == "complete"]
    beaten = {r["number"] for r in done for o in done if o["a"] >= r["a"] and o["b"] >= r["b"] and
              (o["a"], o["b"]) != (r["a"], r["b"])}
    assert {r["number"] for r in front} == {r["number"] for r in done} - beaten
    assert (1 in beaten) == (60 in beaten)  # tied trials stand or fall together


def test_glmc_space_fits_both_cifar_recipes_and_applies_to_a_config():
    for recipe in ("smoke.yaml", "recipes/cifar100_lt_if100/glmc.yaml", "recipes/cifar10_lt_if100/glmc.yaml"):
        base = config_lib.load(REPO / "configs" / recipe)
        space = space_file.load_space(REPO / "configs/search/glmc.yaml", base)
        assert "method.glmc.cumulative_exponent" not in {p.key for p in space.params}  # only with the power shape
        assert space.point(base)["method.glmc.cumulative_exponent"] == base.method.glmc.cumulative_exponent
        assert set(space.keys()) >= {"method.glmc.consistency_weight", "method.glmc.mix_beta", "optim.lr",
                                           "method.glmc.area_corrected_cutmix", "method.glmc.label_weight_exponent",
                                           "method.glmc.resample_exponent", "method.glmc.cumulative_shape",
                                           "method.glmc.cumulative_exponent", "optim.weight_decay"}
    cfg = search_space.apply_values(base, {"method.glmc.cumulative_shape": "cosine", "optim.lr": 0.02})
    assert cfg.method.glmc.cumulative_shape == "cosine" and cfg.optim.lr == 0.02
    assert cfg.train.epochs == base.train.epochs


def test_bad_input_is_one_error_line_before_any_trial(tmp_path, capsys):
    space = str(_space(tmp_path, "optim.lr: {float: [0.01, 0.1], log: true}"))
    cases = [
        (["--config", SMOKE, "--set", "data.val_fraction=0", "--space", space], "no validation split"),
        (["--config", SMOKE, "--set", "data.protocol=paper", "--space", space],
         "no validation split (data.protocol=paper trains on the whole subset)"),
        (["--config", SMOKE, "--set", "optim.lr=-1", "--space", space], "--set optim.lr=-1"),
        (["--config", SMOKE, "--space", str(tmp_path / "missing.yaml")], "does not exist"),
        (["--config", SMOKE, "--space", space, "--trials", "0"], "--trials"),
        (["--config", SMOKE, "--space", space, "--set", "optim.schedule=warmup_cosine",
          "--set", "optim.warmup_epochs=2", "--trial-epochs", "2"], "--trial-epochs 2"),
        (["--config", SMOKE, "--space", space, "--storage-url", "nosuch://db"], "--storage-url nosuch://db"),
        (["--config", SMOKE, "--space", space, "--teacher", "runs/t"], "can choose learns from a teacher run"),
        (["--config", SMOKE, "--space", space, "--objective", "recall"], "--objective recall: 'recall' is not"),
        (["--config", SMOKE, "--space", space, "--pareto", "few"], "--pareto few: a Pareto front needs two"),
        (["--config", SMOKE, *FAST, "--space", space, "--objective", "0.5*many+0.5*few"],  # 58 down to 5 a class
         "--objective 0.5*many+0.5*few: no class of the training split is many (classes with > 100"),
        (["--config", SMOKE, "--space", space, "--objective", "few", "--pareto", "few", "top1"], "not both"),
        (["--config", SMOKE, "--space", space, "--pareto", "few", "top1", "--final-seeds", "2"],
         "--pareto with --fidelity-check or --final-seeds"),
        (["--config", SMOKE, "--space", "methods", "--teacher", str(tmp_path / "no-run")],
         "error: method.deit_lt.teacher: "),
    ]
    for argv, words in cases:
        assert main([*argv, "--output", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- Ray Tune + Optuna

def test_gpus_per_trial_beyond_the_cluster_is_refused(tmp_path, capsys, ray_session):
    space = str(_space(tmp_path, "optim.lr: {float: [0.01, 0.1], log: true}"))
    assert main(["--config", SMOKE, "--space", space, "--gpus-per-trial", "1", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: --gpus-per-trial 1" in err and "GPUs" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "space.yaml"]


def test_search_runs_trials_and_writes_a_trainable_best_config(tmp_path, ray_session, postgres):
    """The method itself is searched (configs/search/methods.yaml): a trial samples its method's knobs only.
    The study is in a real PostgreSQL database (2 trials at once, the driver its only writer)."""
    output = tmp_path / "runs"
    assert main(["--config", SMOKE, *FAST, "--space", str(METHODS_SPACE), "--trials", "4", "--concurrent", "2",
                 "--trial-epochs", "1", "--output", str(output), "--seed", "6", "--storage-url", postgres]) == 0
    experiment = _only_experiment(output)
    assert not (experiment / "study.db").exists()  # no SQLite file beside it
    rows = _rows(experiment)
    assert [int(r["number"]) for r in rows] == [1, 2, 3, 4] and all(r["status"] == "complete" for r in rows)
    base = config_lib.load(SMOKE)  # trial 1 is the recipe itself: GLMC, power shape
    assert rows[0]["method.name"] == "glmc" and rows[0]["method.glmc.cumulative_shape"] == "power"
    assert float(rows[0]["method.glmc.consistency_weight"]) == base.method.glmc.consistency_weight
    assert float(rows[0]["method.glmc.cumulative_exponent"]) == base.method.glmc.cumulative_exponent
    assert float(rows[0]["optim.lr"]) == base.optim.lr
    # TPE's random start with seed 6 samples GLMC with the cosine shape, MDCS and RIDE (its expert methods)
    assert len({r["method.name"] for r in rows}) >= 2
    assert any(r["method.name"] == "glmc" and r["method.glmc.cumulative_shape"] != "power" for r in rows)
    study = _study(experiment, postgres)
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    runs = {p.name.split("-")[1]: p for p in (experiment / "trials").iterdir()}  # a normal run directory each
    assert len(runs) == 4 and all((r / "final.json").exists() and (r / "metrics.jsonl").exists() for r in runs.values())
    for row in rows:
        method = row["method.name"]
        searched = {k: v for k, v in row.items() if v != "" and k.startswith(("method.", "optim."))}
        # never a knob of a method the trial did not choose; the power exponent only with the power shape
        assert all(k.split(".")[1] in ("name", method) for k in searched if k.startswith("method.")), row
        assert ("method.glmc.cumulative_exponent" in searched) == (searched.get("method.glmc.cumulative_shape")
                                                                   == "power"), row
        trial = study.trials[int(row["number"]) - 1]  # Optuna records the same fields, and only those
        assert set(trial.params) == set(searched) and all(str(v) == searched[k] for k, v in trial.params.items())
        saved = yaml.safe_load((runs[row["trial_id"]] / "config.yaml").read_text())  # what the trial trained
        assert saved["method"]["name"] == method and set(saved["method"]) <= {"name", method}
        cfg = config_lib.load(runs[row["trial_id"]] / "config.yaml")
        assert all(str(search_space.get_dotted(cfg, k)) == v for k, v in searched.items()) and cfg.train.epochs == 1
    assert study.trials[0].params["optim.lr"] == base.optim.lr
    best_row = max(rows, key=lambda r: float(r["val_balanced_top1"]))
    best = config_lib.load(experiment / "best_config.yaml")
    assert all(str(search_space.get_dotted(best, k)) == v for k, v in best_row.items() if v != "" and k.startswith(
        ("method.", "optim.")))
    assert best.train.epochs == base.train.epochs and best.data.synthetic_max_count == 64  # full schedule, --set kept
    assert train_main(["--config", str(experiment / "best_config.yaml"), "--dry-run"]) == 0  # the trainer takes it
    assert study.best_value == pytest.approx(float(best_row["val_balanced_top1"]))
    for name in ("optimization_history.png", "slice.png", "param_importances.png"):
        assert (experiment / name).stat().st_size > 5_000, name
    version = json.loads((runs[rows[0]["trial_id"]] / "version.json").read_text())  # the search's, not a worker's
    assert version["command"] == shlex.join(sys.orig_argv) and version["git_commit"] == git_head()


def test_a_methods_search_given_a_teacher_run_trains_deit_lt_students_of_it(tmp_path, ray_session, monkeypatch):
    """--teacher: a trial that chooses deit_lt (TPE's random start with seed 16 does, second) trains the CPU-size
    DeiT with AdamW from that run (named relative to where the search started; the trials run elsewhere), and
    reports both heads; the first trial (the recipe, GLMC) is untouched."""
    monkeypatch.chdir(tmp_path)
    teacher_output = tmp_path / "teacher"
    assert train_main(["--config", SMOKE, *FAST, "--set", "method.name=ldam_drw", "--set", "train.epochs=1",
                       "--set", "model.width=4", "--output", str(teacher_output)]) == 0
    (teacher,) = teacher_output.iterdir()
    output = tmp_path / "runs"
    assert main(["--config", SMOKE, *FAST, "--space", "methods", "--teacher", f"teacher/{teacher.name}",
                 "--trials", "2", "--concurrent", "2",
                 "--trial-epochs", "1", "--output", str(output), "--seed", "16"]) == 0
    experiment = _only_experiment(output)
    rows = _rows(experiment)
    assert [r["method.name"] for r in rows] == ["glmc", "deit_lt"] and all(r["status"] == "complete" for r in rows)
    assert rows[0]["model.arch"] == "" and rows[1]["model.arch"] == "deit_micro_distilled_patch4_32"
    assert 3e-5 <= float(rows[1]["optim.lr"]) <= 1e-3 and rows[1]["method.deit_lt.teacher"] == str(teacher)
    runs = {p.name.split("-")[1]: p for p in (experiment / "trials").iterdir()}
    student = config_lib.load(runs[rows[1]["trial_id"]] / "config.yaml")
    assert (student.method.deit_lt.teacher, student.optim.name, student.train.label_smoothing) == (str(teacher),
                                                                                                 "adamw", 0.1)
    final = json.loads((runs[rows[1]["trial_id"]] / "final.json").read_text())
    assert final["last"]["test"]["expert_names"] == ["cls", "dist"]
    assert "deit_lt" not in json.dumps(config_lib.to_dict(config_lib.load(runs[rows[0]["trial_id"]] / "config.yaml")))


def test_a_pareto_search_writes_the_front_of_its_objectives_with_each_points_config(tmp_path, ray_session):
    """--pareto balanced_top1 0.5*top1+0.5*worst: Optuna maximises both; trials.csv has each objective (the mix
    computed from the trial's own last epoch), pareto.csv exactly the non-dominated trials, each with its config."""
    output = tmp_path / "runs"
    space = _space(tmp_path, "optim.lr: {float: [0.003, 0.3], log: true}\n")
    assert main(["--config", SMOKE, *FAST, "--space", str(space), "--trials", "4", "--concurrent", "2",
                 "--trial-epochs", "1", "--output", str(output), "--pareto", "balanced_top1",
                 "0.5*top1+0.5*worst"]) == 0
    experiment = _only_experiment(output)
    rows = _rows(experiment)
    assert all(r["status"] == "complete" for r in rows) and not (experiment / "best_config.yaml").exists()
    runs = {p.name.split("-")[1]: p for p in (experiment / "trials").iterdir()}
    for row in rows:
        last = rundir.read_metrics(runs[row["trial_id"]])[-1]
        assert float(row["val_balanced_top1"]) == pytest.approx(last["val_balanced_top1"])
        assert float(row["objective_2"]) == pytest.approx(0.5 * last["val_top1"] + 0.5 * last["val_worst"])
    keys = ["val_balanced_top1", "objective_2"]
    scores = {int(r["number"]): tuple(float(r[k]) for k in keys) for r in rows}
    front = {n for n, s in scores.items() if not any(all(o[i] >= s[i] for i in range(2)) and o != s
                                                      for o in scores.values())}
    with open(experiment / "pareto.csv") as f:
        points = list(csv.DictReader(f))
    assert {int(p["number"]) for p in points} == front
    for point in points:
        cfg = config_lib.load(experiment / "pareto" / f"trial_{point['number']}.yaml")
        assert cfg.optim.lr == pytest.approx(float(point["optim.lr"])) and cfg.train.epochs == config_lib.load(
            SMOKE).train.epochs
    study = _study(experiment)
    assert len(study.directions) == 2
    for trial, row in zip(study.trials, rows, strict=True):
        assert trial.values == pytest.approx([float(row[k]) for k in keys])
    for name in ("pareto.png", "optimization_history.png", "slice.png"):
        assert (experiment / name).stat().st_size > 5_000, name


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(tmp_path, ray_session, capfd):
    # the base (first) point has an lr that makes the loss non-finite at once: FloatingPointError
    space = _space(tmp_path, "optim.lr: {float: [0.001, 1.0e+6], log: true}\n")
    output = tmp_path / "runs"
    assert main(["--config", SMOKE, *FAST, "--set", "optim.lr=1e6", "--space", str(space), "--trials", "3",
                 "--concurrent", "2", "--trial-epochs", "1", "--output", str(output)]) == 0
    experiment = _only_experiment(output)
    rows = _rows(experiment)
    assert len(rows) == 3 and rows[0]["status"] == "failed" and rows[0]["val_balanced_top1"] == ""
    assert float(rows[0]["optim.lr"]) == 1e6 and rows[0]["error"].startswith("FloatingPointError: non-finite")
    study = _study(experiment)
    assert len(study.trials) == 3 and study.trials[0].state == optuna.trial.TrialState.FAIL
    runs = {p.name.split("-")[1] for p in (experiment / "trials").iterdir()}
    assert rows[0]["trial_id"] not in runs  # a trial that saved no epoch leaves no run directory, as the trainer
    complete = [r for r in rows if r["status"] == "complete"]
    assert runs == {r["trial_id"] for r in complete}
    if complete:  # the sampled lr may diverge too; whatever completed gives the best config
        assert (experiment / "best_config.yaml").exists()
    # the console: a line per trial event, the best trials, no Tune status table, no traceback
    out = capfd.readouterr()
    console = out.out + out.err
    assert "trial 1 started: optim.lr=1e+06" in console, console
    assert re.search(r"^trial 1 failed: FloatingPointError: non-finite .* \(\d of 3 ended\)$", console, re.M), console
    assert len(re.findall(r"^trial \d (finished in \d+ s: val_balanced_top1|failed: )", console, re.M)) == 3, console
    # (worker lines reach this console through the suite's Ray, started with log_to_driver; a search's own Ray
    # has it off: the resumed search of the next test is run as a user runs it)
    assert "Trial status" not in console and "Traceback" not in console, console
    assert (experiment / "tune").is_dir() and not list(experiment.glob("run_trial_*"))  # Tune's state in tune/


def _mid_trial(output):
    """The run directory of a trial that has finished some epochs but not all, once another finished."""
    if not list(output.glob("*/trials/*/final.json")):
        return None
    for run in output.glob("*/trials/*"):
        if not (run / "final.json").exists() and (run / "checkpoint.pt").exists() and rundir.read_metrics(run):
            return run
    return None


KILLED = """
import sys
from glmc_ray.train import main as train_main
from tuning.search import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_search_resumes_with_every_trial_once(tmp_path, ray_session):
    space = _space(tmp_path, "optim.lr: {float: [0.003, 0.1], log: true}\n"
                             "method.glmc.consistency_weight: {float: [0.1, 20], log: true}\n")
    output = tmp_path / "runs"
    address = ray.get_runtime_context().gcs_address
    argv = ["--config", SMOKE, *FAST, "--space", str(space), "--trials", "4", "--concurrent", "1",
            "--trial-epochs", "3", "--output", str(output), "--address", address]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, "-c", KILLED, *argv], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _mid_trial(output) and time.monotonic() < deadline:  # trial 1 done, trial 2 has epoch 0
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    experiment = _only_experiment(output)
    interrupted = _mid_trial(output)
    assert interrupted is not None and not (experiment / "trials.csv").exists()
    finished_before = {p.parent: p.stat().st_mtime_ns for p in experiment.glob("trials/*/final.json")}
    # resumed as a user runs it, in its own process (connected to the cluster): its console is our lines only
    done = subprocess.run([sys.executable, "tuning/search.py", "--resume", str(experiment), "--address", address],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert_quiet(console)
    assert re.search(r"^trial \d finished in \d+ s: val_balanced_top1 [\d.]+ \(\d of 4 ended", console, re.M), console
    assert "best trials by val_balanced_top1" in console, console
    rows = _rows(experiment)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert all(r["status"] == "complete" for r in rows)
    runs = sorted((experiment / "trials").iterdir())
    assert len(runs) == 4  # one run directory per trial: nothing trained twice in a second folder
    for run, mtime in finished_before.items():  # finished trials are not trained again
        assert (run / "final.json").stat().st_mtime_ns == mtime
    # the interrupted trial continued from its checkpoint: each epoch once
    assert [r["epoch"] for r in rundir.read_metrics(interrupted)] == [0, 1, 2]
    study = _study(experiment)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


def _cut_after_first_trial(output: Path, proxy: CuttableProxy, seconds: float | None) -> threading.Thread:
    """Cuts the database's proxy once a trial has finished (its Optuna trial is told around then, the next one
    asked), and restores it `seconds` later (None: the test restores it)."""
    def cut():
        while not list(output.glob("*/trials/*/final.json")):
            time.sleep(0.1)
        proxy.cut()
        if seconds is not None:
            time.sleep(seconds)
            proxy.restore()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


def _search_through(proxy: CuttableProxy, output: Path, retry_seconds: float, postgres: str) -> list[str]:
    url = postgres.replace(postgres.rsplit(":", 1)[1].split("/")[0], str(proxy.port))
    space = REPO / "configs/search/glmc.yaml"
    return ["--config", SMOKE, *FAST, "--space", str(space), "--trials", "3", "--concurrent", "1",
            "--trial-epochs", "1", "--output", str(output), "--storage-url", url,
            "--set", f"dist.storage_retry_seconds={retry_seconds}"]


def test_a_study_database_outage_within_the_retry_window_is_ridden_out(tmp_path, ray_session, postgres, capsys):
    """The database cut for 8 s between trials: the driver waits for it (pool pre-ping, then a connection
    retried with backoff) and the search finishes with every trial once, all recorded in the study."""
    proxy = CuttableProxy(int(postgres.rsplit(":", 1)[1].split("/")[0]))
    output = tmp_path / "runs"
    cutter = _cut_after_first_trial(output, proxy, 8)
    assert main(_search_through(proxy, output, 60, postgres)) == 0
    cutter.join()
    err = capsys.readouterr().err
    assert "the study database postgresql://glmc@127.0.0.1" in err and "unreachable while connecting" in err, err
    assert "reachable again after" in err and "Traceback" not in err, err
    experiment = _only_experiment(output)
    assert [r["status"] for r in _rows(experiment)] == ["complete"] * 3
    study = _study(experiment, postgres)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    proxy.cut()


def test_a_study_database_outage_past_the_retry_window_ends_the_search_with_one_line_and_it_resumes(
        tmp_path, ray_session, postgres, capsys):
    proxy = CuttableProxy(int(postgres.rsplit(":", 1)[1].split("/")[0]))
    output = tmp_path / "runs"
    cutter = _cut_after_first_trial(output, proxy, None)
    try:
        code = main(_search_through(proxy, output, 3, postgres))
        cutter.join()
    finally:
        proxy.restore()
    err = capsys.readouterr().err
    experiment = _only_experiment(output)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == STORAGE_LOST and len(errors) == 1 and "Traceback" not in err, err
    assert "the study database postgresql://glmc@127.0.0.1" in errors[0] and "stayed unreachable" in errors[0]
    assert errors[0].endswith(f"resume with: python tuning/search.py --resume {experiment}"), errors
    assert main(["--resume", str(experiment)]) == 0
    rows = _rows(experiment)
    assert len({r["trial_id"] for r in rows}) == 3 and all(r["status"] == "complete" for r in rows)
    assert len(list((experiment / "trials").iterdir())) == 3  # nothing trained twice
    proxy.cut()


def test_a_trial_can_be_a_two_worker_ray_train_run(tmp_path, ray_session):
    space = _space(tmp_path, "optim.lr: {float: [0.003, 0.1], log: true}\n")
    output = tmp_path / "runs"
    assert main(["--config", SMOKE, *FAST, "--set", "model.norm=group", "--space", str(space), "--trials", "1",
                 "--concurrent", "1", "--trial-epochs", "2", "--workers-per-trial", "2",
                 "--output", str(output)]) == 0
    experiment = _only_experiment(output)
    rows = _rows(experiment)
    assert len(rows) == 1 and rows[0]["status"] == "complete" and float(rows[0]["optim.lr"]) == 0.05
    (run,) = (experiment / "trials").iterdir()  # a Ray Train run directory: its checkpoints, metrics, final
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1] and (run / "final.json").exists()
    assert list(run.glob("checkpoint_epoch*"))
    assert float(rows[0]["val_balanced_top1"]) == rundir.read_metrics(run)[-1]["val_balanced_top1"]
    assert config_lib.load(experiment / "best_config.yaml").optim.lr == 0.05


def test_spearman_is_the_correlation_of_ranks():
    assert search_full.spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert search_full.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert search_full.spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(0.866, abs=1e-3)  # ties share a mean rank
    assert search_full.spearman([1, 2], [1, 2]) is None  # two points rank nothing


def test_fidelity_check_and_final_seeds_train_the_full_schedule_once_per_run(tmp_path, ray_session, capfd):
    space = _space(tmp_path, "optim.lr: {float: [0.003, 0.1], log: true}\n"
                             "method.glmc.label_weight_exponent: {float: [0.5, 2.0]}\n")
    output = tmp_path / "runs"
    assert main(["--config", SMOKE, *FAST, "--set", "train.epochs=2", "--space", str(space), "--trials", "4",
                 "--concurrent", "2", "--trial-epochs", "1", "--output", str(output)]) == 0
    experiment = _only_experiment(output)
    stages = ["--resume", str(experiment), "--fidelity-check", "3", "--final-seeds", "2"]
    # SIGTERM (handled as Ctrl-C: Tune's graceful stop) once the first full-schedule run has an epoch: exit 143
    # and no report from part of the runs
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-c", KILLED, *stages, "--address", address], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(rundir.read_metrics(r) for r in experiment.glob("full/*-seed*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=120) == 143
    assert not (experiment / "fidelity.json").exists() and not (experiment / "final_seeds.json").exists()
    capfd.readouterr()
    assert main(stages) == 0  # the same command continues the runs and reports
    console = capfd.readouterr().out
    rows = {r["trial_id"]: r for r in _rows(experiment)}
    fidelity = json.loads((experiment / "fidelity.json").read_text())
    assert (fidelity["short_epochs"], fidelity["full_epochs"]) == (1, 2)
    ranked = sorted(rows.values(), key=lambda r: -float(r["val_balanced_top1"]))
    checked = {p["trial_id"] for p in fidelity["pairs"]}  # ranks 1, 3 and 4 of 4 (K=3) and the recipe (trial 1)
    recipe = next(r["trial_id"] for r in ranked if r["number"] == "1")
    assert checked == {ranked[0]["trial_id"], ranked[2]["trial_id"], ranked[3]["trial_id"], recipe}
    for pair in fidelity["pairs"]:
        assert pair["status"] == "complete" and pair["short"] == float(rows[pair["trial_id"]]["val_balanced_top1"])
        run = rundir.read_metrics(Path(pair["run"]))
        assert [r["epoch"] for r in run] == [0, 1] and run[-1]["val_balanced_top1"] == pair["val_balanced_top1"]
        assert config_lib.load(f"{pair['run']}/config.yaml").optim.lr == float(rows[pair["trial_id"]]["optim.lr"])
    pairs = fidelity["pairs"]
    expected = search_full.spearman([p["short"] for p in pairs], [p["val_balanced_top1"] for p in pairs])
    assert fidelity["spearman"] == pytest.approx(expected) and (experiment / "fidelity.png").stat().st_size > 5_000

    final = json.loads((experiment / "final_seeds.json").read_text())
    base = config_lib.load(SMOKE)
    assert final["seeds"] == [base.train.seed, base.train.seed + 1] and final["best_trial"] == ranked[0]["trial_id"]
    for name in ("found", "recipe"):
        runs = final["runs"][name]
        assert [r["seed"] for r in runs] == final["seeds"] and all(r["status"] == "complete" for r in runs)
        tops = [r["test_top1"] for r in runs]  # each run's row, from its final.json
        assert final["summary"][name]["metrics"]["top1"]["mean"] == pytest.approx(sum(tops) / 2)
        assert final["summary"][name]["runs"] == [r["run"] for r in runs] and final["summary"][name]["failed"] == 0
        for r in runs:
            cfg = config_lib.load(f"{r['run']}/config.yaml")
            assert cfg.train.seed == r["seed"] and cfg.train.epochs == 2
    recipe_run = config_lib.load(f"{final['runs']['recipe'][0]['run']}/config.yaml")
    assert recipe_run.optim.lr == base.optim.lr
    # a run both stages need (the recipe, the winner at the first seed) is trained once: one folder per run
    wanted = {(p["label"], base.train.seed) for p in fidelity["pairs"]}
    wanted |= {(r["label"], r["seed"]) for runs in final["runs"].values() for r in runs}
    folders = [p for p in (experiment / "full").iterdir() if p.name != "tune"]
    assert len(folders) == len(wanted) and all((p / "final.json").exists() for p in folders)
    # the console: what the stages train, then a line per run as it ends
    assert f"full schedule: {len(wanted)} runs of 2 epochs, 2 at once" in console, console
    ended = re.findall(r"^full run (\S+) seed (\d+) finished in \d+ s: val_balanced_top1 [\d.]+, test top-1 [\d.]+ "
                       r"\(\d of (\d) ended\)$", console, re.M)
    assert {(label, int(seed)) for label, seed, _ in ended} == wanted and {t for *_, t in ended} == {str(len(wanted))}
    # the two stages again (as after an interruption): every run is found finished, nothing is trained
    mtimes = {p: (p / "final.json").stat().st_mtime_ns for p in folders}
    assert main(["--resume", str(experiment), "--final-seeds", "2"]) == 0
    assert {p: (p / "final.json").stat().st_mtime_ns for p in folders} == mtimes
    assert json.loads((experiment / "final_seeds.json").read_text())["summary"] == final["summary"]


def test_the_best_trials_table_names_a_tie_and_which_trial_best_config_takes():
    rows = [{"number": n, "status": status, "val_balanced_top1": score, "test_top1": 40.0 + n, "optim.lr": 0.01 * n,
             "method.glmc.mix_beta": None}
            for n, status, score in [(1, "complete", 50.0), (2, "failed", None), (3, "complete", 52.5),
                                     (4, "complete", 52.5), (5, "complete", 49.0)]]
    table = console.best_table(rows, ["optim.lr", "method.glmc.mix_beta"], "val_balanced_top1").splitlines()
    assert table[1].split()[:3] == ["trial", "3", "52.50"] and "optim.lr=0.03" in table[1]
    assert "mix_beta" not in table[1]  # not searched by that trial
    assert [line.split()[1] for line in table[1:5]] == ["3", "4", "1", "5"]
    assert table[-1].startswith("trials 3, 4 tie at 52.50; best_config.yaml is trial 3's (the first asked)")
    assert console.best_table([rows[1]], ["optim.lr"], "val_balanced_top1") == ""


def test_a_dry_run_checks_the_search_by_names_and_prints_a_loadable_base_config(capsys, tmp_path):
    assert main(["--config", "smoke", "--space", "methods", "--trial-epochs", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# 64 trials of 2 epochs, 4 at once" in out and "#   method.name: glmc" in out
    assert "#   method.ldam_drw.max_margin: (not searched by the first trial)" in out
    (tmp_path / "base.yaml").write_text(out)
    assert config_lib.load(tmp_path / "base.yaml") == config_lib.load(SMOKE)
    assert main(["--config", "smoke", "--space", "method", "--dry-run"]) == 2
    assert "--space method: no such file, and no packaged config of that name" in capsys.readouterr().err


def test_tunes_state_is_in_tune_and_an_older_experiment_keeps_its_own(tmp_path):
    (tmp_path / "new" / "tune").mkdir(parents=True)
    assert trials.tune_location(tmp_path / "new") == str(tmp_path / "new" / "tune")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tuner.pkl").write_bytes(b"")  # Tune's state beside search.json, as before tune/
    assert trials.tune_location(tmp_path / "old") == str(tmp_path / "old")
