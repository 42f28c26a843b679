"""The method sections of the config: one dataclass per long-tail method with settings, under `method`, and
their range checks (each `(ok, key, value, expected)`, judged by config.validate). Re-exported by
glmc_ray.core.config, where the rest of the config lives."""
from __future__ import annotations

from dataclasses import dataclass, field


# One section per method that has settings, under `method`: `method: {name: ldam_drw, ldam_drw: {...}}`.
# Only the chosen method's section may be written; ce and balanced_softmax have no settings.
@dataclass
class GLMCConfig:
    resample_exponent: float = 0.0  # q: the re-balanced stream draws class c with prob ∝ n_c^(1-q)
    label_weight_exponent: float = 1.2  # gamma: class weights w_c ∝ n_c^-gamma on the re-balanced head
    consistency_weight: float = 1.0  # lambda_c on the SimSiam global/local consistency term
    mix_beta: float = 1.0  # lambda ~ Beta(b, b); the official code effectively uses 1.0 (its --beta is dead)
    area_corrected_cutmix: bool = False  # CutMix label from the pasted area (the official code uses lambda)
    cumulative_shape: str = "power"  # power: 1-u^p | cosine | linear
    cumulative_exponent: float = 2.0  # p of the power shape (official 2)
    cumulative_per_step: bool = False  # evaluate alpha per iteration instead of per epoch (official)
    maxnorm_threshold: float = 0.0  # > 0 enables MaxNorm PGD on the re-balanced head (fraction, LTWB uses 0.1)
    # The re-balanced head's loss: weighted_ce (official: soft CE on gamma-weighted mixed targets) |
    # balanced_softmax_unofficial (NOT the paper's GLMC + BS, which has no code: Balanced Softmax on that head,
    # unweighted targets; glmc_ray/methods/glmc.py)
    rebalanced_loss: str = "weighted_ce"


@dataclass
class LogitAdjustedConfig:
    tau: float = 1.0  # loss CE(z + tau * log pi); 1 is the paper's and equals Balanced Softmax


@dataclass
class LDAMDRWConfig:
    max_margin: float = 0.5  # the rarest class's margin on cosine logits; m_c ∝ n_c^-1/4
    scale: float = 30.0  # s: the loss (and evaluation) multiplies the cosine logits by it
    drw_start: float = 0.8  # re-weighting from the first epoch with epoch/epochs >= this (official 160/200)
    drw_beta: float = 0.9999  # DRW's effective-number weights (1 - beta) / (1 - beta^n_c)


@dataclass
class ClassBalancedConfig:
    beta: float = 0.9999  # effective-number weights (1 - beta) / (1 - beta^n_c); 0 gives plain CE
    focal_gamma: float = 0.0  # > 0: softmax focal loss (1 - p_y)^gamma * CE


@dataclass
class RIDEConfig:
    max_margin: float = 0.5  # LDAM margins of each expert's loss (RIDE's base loss)
    drw_start: float = 0.8  # deferred re-weighting and per-class diversity temperatures from here (160/200)
    drw_beta: float = 0.9999
    # lambda of the diversity term lambda * T^2 * KL(softmax(mean/T) || softmax(z_e/T)): negative rewards an
    # expert for differing from the ensemble (official -0.45 on CIFAR-100-LT, -0.2 on ImageNet-LT)
    diversity_factor: float = -0.45
    diversity_temperature: float = 1.0  # T before DRW; after it the factor of the per-class T_c (official 1)
    reweight_factor: float = 0.05  # r of the per-class T_c ∝ C pi_c r + 1 - r after DRW (0.02 ImageNet-LT)
    # experts: stage 1 | router: expert assignment, a second run from a stage-1 run (train.init_from) that
    # trains only the router; evaluation then uses, per sample, the experts the router picks
    stage: str = "experts"
    router_hidden: int = 16  # the router's per-expert feature projection (official 16)
    router_top_k: int = 30  # how many of the running mean logits it sees, largest first (official 30; <= classes)
    router_pos_weight: float = 100.0  # BCE weight of "the next expert helps" (official 100)
    # distillation (stage 1): a finished RIDE run whose ensemble teaches this one's (official: 6 experts), adding
    # distill_weight * T_d^2 * KL(softmax(teacher / T_d) || softmax(mean / T_d)) once per step ("" = none)
    teacher: str = ""
    distill_temperature: float = 1.5  # T_d (official 1.5)
    distill_weight: float = 1.0  # (official 1.0)
    # degrees of the random rotation the weak view x1 gets after the crop and flip of the crop_flip list (the
    # official CIFAR transform's RandomRotation(15); 0: none); the simclr list (ImageNet-LT) has none officially
    weak_rotation: float = 15.0


@dataclass
class MDCSConfig:
    # q_k per expert: expert k trains on z_k + q_k log n (head-, medium-, tail-leaning); one per model.experts
    prior_exponents: list[float] = field(default_factory=lambda: [-0.5, 1.0, 2.5])
    consistency_weight: float = 0.6  # of the weak-to-strong self-distillation KL
    consistency_ramp: float = 0.05  # the KL's weight ramps linearly to full over this fraction of the schedule
    #                                 (official 20 of 400 epochs; 1-based, so 1/20 of it in the first epoch)
    # degrees of the random rotation the weak view x1 gets after the crop and flip of the crop_flip list (the
    # official CIFAR transform's RandomRotation(15); 0: none); the simclr list (ImageNet-LT) has none officially
    weak_rotation: float = 15.0


@dataclass
class SHIKEConfig:
    # mixture: stage 1 (per-expert CE, hardest-negative knowledge transfer, mutual KL) | retrain: stage 2, a
    # second run from a stage-1 run (train.init_from) that trains only the re-trained heads with Balanced Softmax
    stage: str = "mixture"
    transfer_weight: float = 10.0  # of the decoupled knowledge transfer (hardest-negative) KL
    mutual_weight: float = 1.0  # of the experts' mutual KLs


@dataclass
class DeiTLTConfig:
    # the finished run of this harness (its directory or storage copy) whose network, frozen, labels each batch
    # for the distillation token: officially a ResNet-32 on CIFAR, a ResNet-50 on ImageNet-LT and iNat
    teacher: str = ""
    alpha: float = 0.5  # L = (1 - alpha) CE_soft(cls token, mixed targets) + alpha CE(dist token, teacher argmax)
    # deferred re-weighting of the distillation term, with class-balanced weights (drw_beta) summing to C, from
    # this fraction of the schedule (official: 1100/1200 CIFAR, 1200/1400 ImageNet-LT, 900/1000 iNat; 1: none)
    drw_start: float = 0.9
    drw_beta: float = 0.9999
    # timm's Mixup in batch mode (each worker's batch mixed with itself reversed), drawn from the run's keyed
    # generator: CutMix (area-corrected) with probability switch_prob, else Mixup; 0 turns either off
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    mix_after_drw: bool = False  # the official CIFAR scripts stop mixing at DRW (--no-mixup-drw); ImageNet-LT not


METHOD_NAMES = ("glmc", "ce", "balanced_softmax", "logit_adjusted", "ldam_drw", "class_balanced", "ride", "mdcs",
                "shike", "deit_lt")
# Methods that learn from another run's network, and the key naming that run (runs/parent_run.check_teacher)
TEACHER_KEYS = {"ride": "method.ride.teacher", "deit_lt": "method.deit_lt.teacher"}
TEACHER_REQUIRED = ("deit_lt",)  # cannot train without one (RIDE's is optional)
# The multi-expert methods and their expert layout (glmc_ray/models/experts.py)
EXPERT_LAYOUTS = {"ride": "ride", "mdcs": "ride", "shike": "shike"}
DEFAULT_EXPERTS = 3


@dataclass
class MethodConfig:
    name: str = "glmc"  # glmc | ce | balanced_softmax | logit_adjusted | ldam_drw | class_balanced | ride | mdcs |
    #                     shike | deit_lt
    glmc: GLMCConfig = field(default_factory=GLMCConfig)
    logit_adjusted: LogitAdjustedConfig = field(default_factory=LogitAdjustedConfig)
    ldam_drw: LDAMDRWConfig = field(default_factory=LDAMDRWConfig)
    class_balanced: ClassBalancedConfig = field(default_factory=ClassBalancedConfig)
    ride: RIDEConfig = field(default_factory=RIDEConfig)
    mdcs: MDCSConfig = field(default_factory=MDCSConfig)
    shike: SHIKEConfig = field(default_factory=SHIKEConfig)
    deit_lt: DeiTLTConfig = field(default_factory=DeiTLTConfig)

    @property
    def section(self):
        """The chosen method's settings (None for a method without any)."""
        return getattr(self, self.name, None)


def rebalanced_stream(cfg) -> float | None:
    """The exponent q of the class-rebalanced second training stream (class c drawn with probability
    ∝ n_c^(1-q): Batch.rx1/rx2/ry) for the methods that train on one, None for the others: GLMC's
    method.glmc.resample_exponent, and class-balanced (q = 1) for RIDE's router stage, as its official
    BalancedSampler."""
    if cfg.method.name == "glmc":
        return cfg.method.glmc.resample_exponent
    if cfg.method.name == "ride" and cfg.method.ride.stage == "router":
        return 1.0
    return None


def method_checks(method: MethodConfig) -> list[tuple]:
    """(ok, key, value, expected) range checks of every method section (the unchosen ones hold defaults)."""
    glmc, la, ldam, cb = method.glmc, method.logit_adjusted, method.ldam_drw, method.class_balanced
    return [
        (glmc.mix_beta > 0, "method.glmc.mix_beta", glmc.mix_beta, "a positive number"),
        (glmc.cumulative_exponent > 0, "method.glmc.cumulative_exponent", glmc.cumulative_exponent, "> 0"),
        (glmc.consistency_weight >= 0, "method.glmc.consistency_weight", glmc.consistency_weight, ">= 0"),
        (0 <= glmc.maxnorm_threshold <= 1, "method.glmc.maxnorm_threshold", glmc.maxnorm_threshold,
         "a fraction in [0, 1] (0 disables MaxNorm)"),
        (0 <= la.tau <= 5, "method.logit_adjusted.tau", la.tau, "in [0, 5] (1: the paper's; 0: plain CE)"),
        (0 <= ldam.max_margin <= 1, "method.ldam_drw.max_margin", ldam.max_margin,
         "in [0, 1] (a margin on cosine logits; official 0.5)"),
        (0 < ldam.scale <= 100, "method.ldam_drw.scale", ldam.scale, "in (0, 100] (official 30)"),
        (0 <= ldam.drw_start <= 1, "method.ldam_drw.drw_start", ldam.drw_start,
         "a fraction of the schedule in [0, 1] (official 0.8 = 160/200; 1: no re-weighting)"),
        (0 <= ldam.drw_beta < 1, "method.ldam_drw.drw_beta", ldam.drw_beta, "in [0, 1) (official 0.9999)"),
        (0 <= cb.beta < 1, "method.class_balanced.beta", cb.beta, "in [0, 1) (0: plain CE)"),
        (0 <= cb.focal_gamma <= 5, "method.class_balanced.focal_gamma", cb.focal_gamma, "in [0, 5] (0: no focal term)"),
        *_expert_method_checks(method),
    ]


def _expert_method_checks(method: MethodConfig) -> list[tuple]:
    ride, mdcs, shike = method.ride, method.mdcs, method.shike
    return [
        (0 <= ride.max_margin <= 1, "method.ride.max_margin", ride.max_margin, "in [0, 1] (official 0.5)"),
        (0 <= ride.drw_start <= 1, "method.ride.drw_start", ride.drw_start, "a fraction of the schedule in [0, 1]"),
        (0 <= ride.drw_beta < 1, "method.ride.drw_beta", ride.drw_beta, "in [0, 1) (official 0.9999)"),
        (0 <= ride.weak_rotation <= 180, "method.ride.weak_rotation", ride.weak_rotation, "degrees in [0, 180]"),
        (0 <= mdcs.weak_rotation <= 180, "method.mdcs.weak_rotation", mdcs.weak_rotation, "degrees in [0, 180]"),
        (ride.router_hidden > 0, "method.ride.router_hidden", ride.router_hidden, "a positive integer"),
        (ride.router_top_k > 0, "method.ride.router_top_k", ride.router_top_k, "a positive integer"),
        (ride.router_pos_weight > 0, "method.ride.router_pos_weight", ride.router_pos_weight, "> 0 (official 100)"),
        (-5 <= ride.diversity_factor <= 5, "method.ride.diversity_factor", ride.diversity_factor,
         "in [-5, 5] (negative rewards diversity; official -0.45 CIFAR, -0.2 ImageNet-LT)"),
        (ride.diversity_temperature > 0, "method.ride.diversity_temperature", ride.diversity_temperature, "> 0"),
        (ride.distill_temperature > 0, "method.ride.distill_temperature", ride.distill_temperature, "> 0"),
        (ride.distill_weight >= 0, "method.ride.distill_weight", ride.distill_weight, ">= 0"),
        (0 <= ride.reweight_factor <= 1, "method.ride.reweight_factor", ride.reweight_factor, "in [0, 1]"),
        (mdcs.consistency_weight >= 0, "method.mdcs.consistency_weight", mdcs.consistency_weight, ">= 0"),
        (0 < mdcs.consistency_ramp <= 1, "method.mdcs.consistency_ramp", mdcs.consistency_ramp,
         "a fraction of the schedule in (0, 1] (official 0.05 = 20/400 epochs)"),
        (all(-10 <= q <= 10 for q in mdcs.prior_exponents), "method.mdcs.prior_exponents", mdcs.prior_exponents,
         "exponents in [-10, 10] (official -0.5, 1, 2.5)"),
        (shike.transfer_weight >= 0, "method.shike.transfer_weight", shike.transfer_weight, ">= 0"),
        (shike.mutual_weight >= 0, "method.shike.mutual_weight", shike.mutual_weight, ">= 0"),
        *_deit_lt_checks(method.deit_lt),
    ]


def _deit_lt_checks(deit: DeiTLTConfig) -> list[tuple]:
    return [
        (0 <= deit.alpha <= 1, "method.deit_lt.alpha", deit.alpha, "in [0, 1] (official 0.5)"),
        (0 <= deit.drw_start <= 1, "method.deit_lt.drw_start", deit.drw_start, "a fraction of the schedule in [0, 1]"),
        (0 <= deit.drw_beta < 1, "method.deit_lt.drw_beta", deit.drw_beta, "in [0, 1) (official 0.9999)"),
        (deit.mixup_alpha >= 0, "method.deit_lt.mixup_alpha", deit.mixup_alpha, ">= 0 (0: no Mixup)"),
        (deit.cutmix_alpha >= 0, "method.deit_lt.cutmix_alpha", deit.cutmix_alpha, ">= 0 (0: no CutMix)"),
        (0 <= deit.switch_prob <= 1, "method.deit_lt.switch_prob", deit.switch_prob, "a probability"),
    ]


def teacher_of(cfg) -> tuple[str, str] | None:
    """(key, run) of the run's distillation teacher, None without one."""
    key = TEACHER_KEYS.get(cfg.method.name)
    run = getattr(cfg.method.section, "teacher", "") if key else ""
    return (key, run) if run else None


# The head each method trains when model.classifier is auto; cosine only where the method scales cosines.
DEFAULT_CLASSIFIER = {"ldam_drw": "cosine"}


def default_classifier(method_name: str) -> str:
    return DEFAULT_CLASSIFIER.get(method_name, "linear")
