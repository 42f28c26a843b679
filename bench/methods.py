"""Every long-tail method under one protocol: the same subset, validation split, seeds, schedule
length and Many/Medium/Few groups; the last epoch of each run is reported, post-hoc tau is chosen on validation.

Protocol (docs/benchmarks.md, "Reduced accuracy protocol", as bench/search.py runs it): real CIFAR-10-LT
IF 100 (`glmc` subset, seed 3407), ResNet-32 width 16, batch 64, 10 epochs, cosine lr ending in epoch 10,
10 % of the training images held out as the validation split. Each method keeps its official optimiser
and knobs, compressed to this schedule (METHODS: the lr scaled linearly to batch 64 from the official
batch; no warm-up, since 5 of 200 epochs is a quarter of one here; DRW from epoch 8 as 160/200).

The runs are `tuning/search.py`'s full-schedule runs: Ray Tune trains them --concurrent at a time with one
thread each, each in its own run directory; repeating the command with --experiment continues unfinished
runs and reuses finished ones, so methods and seeds can be added to an experiment later. A second stage
(STAGE2: SHIKE's classifier re-training) runs after its first stage, from that seed's first-stage run directory
(train.init_from); its minutes are its own. DeiT-LT's students run after their teacher, that seed's ldam_drw run.

    python bench/methods.py --data-root ../shared/data [--methods ce bs ...] [--seeds 3407 3408]
        [--experiment runs/bench-methods/<stamp>]

Writes bench/results/methods_cifar10_lt.json (per method, glmc_ray.compare's groups of the experiment's runs:
test top-1, balanced top-1, Many, Medium, the 3 rarest classes, post-hoc logit adjustment, validation balanced
top-1, minutes, mean and std over the seeds, each run's values and per-class accuracy) and
docs/img/methods_per_class.png (mean per-class test accuracy of each method against the class counts). The same
table for any experiment: python -m glmc_ray.compare runs/bench-methods/<stamp>.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.runs import comparison, plots, rundir
from glmc_ray.search import full as search_full
from glmc_ray.search import trials
from glmc_ray.search.full import FULL_DIR, FullRun
from glmc_ray.search.options import SearchOptions

sys.path.insert(0, str(Path(__file__).parent))
from search import PROTOCOL  # noqa: E402  (bench/search.py: the same reduced protocol)

LR_128 = 0.1 * 64 / 128  # the official lr 0.1 at batch 128 (LDAM, CB, LA, their CE), at batch 64
# label: (what it is, the dotted values on top of configs/recipes/cifar10_lt_if100/glmc.yaml + PROTOCOL)
METHODS = {
    "ce": ("CE (the LDAM codebase's ERM: lr 0.1 @128, wd 2e-4)",
           {"method.name": "ce", "optim.lr": LR_128, "optim.weight_decay": 2e-4}),
    "bs": ("Balanced Softmax (BALMS: lr 0.1 @512, wd 5e-4)",
           {"method.name": "balanced_softmax", "optim.lr": 0.1 * 64 / 512, "optim.weight_decay": 5e-4}),
    "la": ("LA loss, tau 1 (lr 0.1 @128 Nesterov, L2 1e-4 = wd 2e-4)",
           {"method.name": "logit_adjusted", "optim.lr": LR_128, "optim.weight_decay": 2e-4,
            "optim.nesterov": True}),
    "ldam_drw": ("LDAM-DRW (max margin 0.5, s 30, cosine classifier, DRW beta 0.9999 from epoch 8; lr 0.1 @128, "
                 "wd 2e-4)", {"method.name": "ldam_drw", "optim.lr": LR_128, "optim.weight_decay": 2e-4}),
    "cb": ("CB softmax CE, beta 0.9999 (lr 0.1 @128, wd 2e-4)",
           {"method.name": "class_balanced", "optim.lr": LR_128, "optim.weight_decay": 2e-4}),
    "glmc": ("GLMC, the official README recipe (lr 0.01 @64, wd 5e-3, gamma 1.2, q 0, lambda_c 1)", {}),
    "glmc_bs": ("GLMC + Balanced Softmax on the re-balanced head (unofficial option), recipe otherwise",
                {"method.glmc.rebalanced_loss": "balanced_softmax_unofficial"}),
    "glmc_found": ("GLMC with the searched recipe (docs/benchmarks.md, trial #14)",
                   {"method.glmc.label_weight_exponent": 0.5942564728261792,
                    "method.glmc.resample_exponent": 0.46563009113350284,
                    "method.glmc.consistency_weight": 0.6124417029940649,
                    "method.glmc.mix_beta": 0.31528938779208004, "method.glmc.area_corrected_cutmix": True,
                    "method.glmc.cumulative_shape": "linear",
                    "optim.lr": 0.006468766530035321, "optim.weight_decay": 0.0010986964850141486}),
}
# GLMC with the APA paper's backbone (every ReLU an AGLU, APA-gated SE blocks) on the searched recipe
METHODS["glmc_found_apa"] = ("GLMC, searched recipe, with AGLU activations and APA-SE blocks (model.activation aglu, "
                             "model.se apa; the APA scalars without weight decay)",
                             {**METHODS["glmc_found"][1], "model.activation": "aglu", "model.se": "apa"})
# The multi-expert methods (3 experts, ResNet-32 width 16 as the rest; their official optimisers at batch 64)
METHODS.update({
    "ride": ("RIDE stage 1, 3 experts at RIDE's reduced width, lambda -0.45, LDAM-DRW per expert (DRW from epoch 8); "
             "lr 0.1 @128 Nesterov, wd 5e-4", {"method.name": "ride", "optim.lr": LR_128, "optim.nesterov": True,
                                              "optim.weight_decay": 5e-4}),
    "mdcs": ("MDCS, 3 experts (q -0.5, 1, 2.5), weak crop+flip / strong AutoAugment + Cutout views; lr 0.1 @64 "
             "per view Nesterov, wd 5e-4", {"method.name": "mdcs", "data.strong_augmentation": "autoaugment_cutout",
                                            "optim.lr": 0.1, "optim.nesterov": True, "optim.weight_decay": 5e-4}),
    "shike": ("SHIKE stage 1 (the mixture, 3 experts with shallow experts; no classifier re-training) on the weak "
              "crop + flip view (not the official AutoAugment + Cutout); lr 0.15 @128, wd 5e-4",
              {"method.name": "shike", "data.strong_augmentation": "none", "optim.lr": 0.15 * 64 / 128,
               "optim.weight_decay": 5e-4}),
})
# The CPU-size DeiT (2 blocks of width 64 at 32 px, patch 4) with DeiT-LT's optimiser: AdamW, lr 5e-4 @512, wd 0.05,
# drop path 0.1 (no warm-up, as the rest). A ViT from scratch in 10 epochs is weak: what is measured is the
# distillation's effect against the same ViT without a teacher.
DEIT = {"model.arch": "deit_micro_distilled_patch4_32", "optim.name": "adamw", "optim.lr": 5e-4 * 64 / 512,
        "optim.weight_decay": 0.05, "optim.nesterov": False, "model.drop_path": 0.1}
METHODS["ce_deit"] = ("CE on the CPU-size DeiT (deit_micro: 2 blocks of width 64; AdamW lr 5e-4 @512, wd 0.05, "
                      "drop path 0.1), no teacher, no mixing", {"method.name": "ce", **DEIT})
DEIT_LT = {"method.name": "deit_lt", **DEIT, "method.deit_lt.drw_start": 0.9,  # DRW in epoch 10 (1100/1200)
           "train.label_smoothing": 0.1}
# Runs from another run of the same seed: label -> (what it is, the other run's label, the dotted values, the key
# naming that run's directory). SHIKE re-trains its classifiers for the last 20 of 200 epochs: 2 epochs after the
# protocol's 10, at the official lr 0.05 @128 (no warm-up, as the rest), Balanced Softmax per expert, every other
# parameter and statistic frozen (train.init_from). DeiT-LT's students learn from the ldam_drw run of their seed.
STAGE2 = {"shike_retrain": ("SHIKE stage 2: its re-trained classifiers, 2 epochs from the shike run (lr 0.05 @128; "
                            "only the rt heads train)", "shike",
                            {**METHODS["shike"][1], "method.shike.stage": "retrain", "train.epochs": 2,
                             "optim.lr": 0.05 * 64 / 128}, "train.init_from"),
          "deit_lt": ("DeiT-LT: the CPU-size DeiT (as ce_deit) distilled from the ldam_drw run of its seed, alpha "
                      "0.5, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, DRW (beta 0.9999) in epoch 10", "ldam_drw",
                      DEIT_LT, "method.deit_lt.teacher"),
          "deit_lt_no_teacher": ("DeiT-LT's loss with alpha 0: its cls token on the mixed, smoothed targets alone (the "
                                 "teacher is loaded, its term weighs nothing)", "ldam_drw",
                                 {**DEIT_LT, "method.deit_lt.alpha": 0.0}, "method.deit_lt.teacher")}
TABLE = ["top1", "balanced_top1", "many", "medium", "rarest3", "posthoc_top1", "val_balanced_top1", "minutes"]
PUBLISHED = {  # methods-reference.md: the published ordering at paper scale (200+ epochs, full width)
    "cifar10_lt_if200_balms_readme": {"ce": 74.0, "bs": 79.8},
    "cifar10_lt_if50_cb_issue5": {"ce": 75.98, "cb": 79.18},
}


def base_config(data_root: str, overrides: list[str]) -> config_lib.Config:
    sets = [f"data.root={Path(data_root).resolve()}", *PROTOCOL, "name=methods", *overrides]
    return config_lib.load("configs/recipes/cifar10_lt_if100/glmc.yaml", sets)


def finished_runs(experiment: Path, base: config_lib.Config, label: str, seed: int | str = "*") -> list[Path]:
    return [run for run in sorted((experiment / FULL_DIR).glob(f"{base.name}-{label}-seed{seed}-*"))
            if (run / "final.json").is_file()]


def second_stage(experiment: Path, base: config_lib.Config, label: str, seed: int) -> FullRun | None:
    """The run of `seed` from that seed's finished first-stage (or teacher) run (None, said, if it has none)."""
    _, first, values, key = STAGE2[label]
    parents = finished_runs(experiment, base, first, seed)
    if not parents:
        print(f"{label} seed {seed}: no finished {first} run of that seed in {experiment}; not trained", flush=True)
        return None
    return FullRun(label, {**values, key: str(parents[-1])}, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="../shared/data", help="the folder holding cifar-10-batches-py/")
    p.add_argument("--methods", nargs="+", default=[*METHODS, *STAGE2], choices=[*METHODS, *STAGE2],
                   help="a second stage (shike_retrain) or a student (deit_lt) also trains its first stage (shike) "
                        "or teacher (ldam_drw) where unfinished")
    p.add_argument("--seeds", nargs="+", type=int, default=[3407, 3408], help="train.seed of each run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the protocol (a quick check: --set train.epochs=1); recorded in the JSON")
    p.add_argument("--concurrent", type=int, default=2, help="runs trained at once")
    p.add_argument("--output", default="runs/bench-methods", help="parent folder of the runs it trains")
    p.add_argument("--experiment", help="continue (or add methods or seeds to) this experiment directory")
    p.add_argument("--json", default="bench/results/methods_cifar10_lt.json", help="the results (JSON)")
    p.add_argument("--plot", default="docs/img/methods_per_class.png", help="where the per-class plot is written (PNG)")
    args = p.parse_args()

    from glmc_ray.distributed import cluster

    base = base_config(args.data_root, args.overrides)
    if args.experiment:
        experiment = Path(args.experiment).resolve()
    else:
        experiment = rundir.new_stamped_folder(Path(args.output), "methods")
    experiment.mkdir(parents=True, exist_ok=True)
    seconds = [label for label in args.methods if label in STAGE2]
    firsts = list(dict.fromkeys([label for label in args.methods if label in METHODS] +
                                [STAGE2[label][1] for label in seconds]))
    jobs = [FullRun(label, METHODS[label][1], seed) for label in firsts for seed in args.seeds]
    opts = SearchOptions(space="", concurrent=args.concurrent, cpus_per_trial=1.0, gpus_per_trial=0.0)
    trials.set_environment()
    cluster.connect(None, args.concurrent)
    print(f"experiment {experiment}: {len(jobs)} runs, {args.concurrent} at a time", flush=True)
    results = search_full.train_full(experiment, base, opts, jobs)
    stage2 = [job for label in seconds for seed in args.seeds if (job := second_stage(experiment, base, label, seed))]
    if stage2:
        print(f"second stages: {len(stage2)} runs", flush=True)
        results += search_full.train_full(experiment, base, opts, stage2)

    # every finished run of the experiment counts, also those of earlier invocations (other seeds, methods)
    groups, notes = comparison.compare([str(experiment / FULL_DIR)])
    for group in groups:
        group.name = group.name.removeprefix(f"{base.name}-")
    described = {label: what for label, (what, *_) in {**METHODS, **STAGE2}.items()}
    report = {"experiment": str(experiment), "protocol": PROTOCOL + args.overrides, "seeds": args.seeds,
              "methods": described, "published": PUBLISHED, "metrics": comparison.METRICS,
              "unfinished": [r for r in results if r["status"] != "complete"],
              "class_counts": list(groups[0].runs[0].class_counts), "groups": [g.summary() for g in groups]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    title = f"CIFAR-10-LT IF 100, {base.train.epochs} epochs, last epoch (mean over {len(args.seeds)} seeds)"
    plots.methods_per_class_plot({g.name: g.per_class() for g in groups}, report["class_counts"], Path(args.plot),
                                 title=title)
    print("\n".join([*notes, comparison.markdown_table(groups, comparison.shown_metrics(groups, TABLE))]))
    print(f"JSON in {args.json}, plot in {args.plot}; unfinished runs: {len(report['unfinished'])}")

if __name__ == "__main__":
    main()
