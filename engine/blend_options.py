"""Options of the multi-stage edit (engine.blended): its choices, defaults and checks."""
import math
from dataclasses import dataclass

# after the step at t (MSBD, BLD-SD2), after at t_prev, before at t (BLD-LDM)
BLENDS = ("after", "exact", "before")
UPSCALERS = ("sr", "bicubic")
STAGE_MODELS = ("sr", "base")
# the schedule the stages' start fractions count on: the stage model's own, or SD's (MSBD's),
# carried over to the stage model's by noise level
START_ON = ("stage", "sd")
RERANKS = ("whole", "masked")
# the original the stages blend in outside the mask: low-passed to the previous stage's detail
# (MSBD's 'matching'), to half the stage's side, or as it is
LOWPASS = ("matching", "half", "no")
# the side ratio between stages: ours ×4, one ×4 upscale each; MSBD's ≤ ×2.7, as ×2
STAGE_RATIOS = (4, 2)


@dataclass(frozen=True)
class Options:
    """Defaults are MSBD's (algorithms.md §4) unless noted."""
    steps: int = 50                 # stage 1 DDIM steps
    guidance: float = 7.5           # stage 1 CFG
    eta: float = 1.0
    candidates: int = 5             # stage 1 batch, reranked by CLIP
    rerank: str = "whole"           # score the whole sample (MSBD) or only the masked region (BLD)
    repaint: int = 5                # RePaint repeats per step, stage 1 only
    jump: int = 1
    blend: str = "after"
    dilate: int = 0                 # progressive mask dilation (BLD), stage 1
    upscaler: str = "sr"            # our ×4 model, or bicubic
    sr_steps: int = 20              # ours: DDIM steps of each ×4 super-resolution
    sr_noise_level: int = 20
    sr_guidance: float = 1.0
    # ours: back-project each stage's output onto what it upscaled (images.back_project)
    backproject: int = 3
    # ours: ×4 stages, the ×4 model upscaling the previous stage resized to a quarter of the stage;
    # 2: ×2 stages, the ×4 model upscaling the previous stage resized to half the stage (as it is
    # but in the last stage), its output resized to the stage (MSBD: Real-ESRGAN ×4, resized)
    stage_ratio: int = 4
    # ours: the SR model denoises the stages (the base one knows only its own size)
    stage_model: str = "sr"
    # CFG of the stages' blended diffusion; None: the stage model's (sr_guidance, or guidance for
    # the base model). MSBD: 7.5
    stage_guidance: float | None = None
    # the stages' schedule, of which the lowest `start` fraction runs (0: none, the upscale as it
    # is, as MSBD's "SR only" ablation)
    stage_steps: int = 100
    start: float = 0.4
    tiled_start: float = 0.25
    # ours: counted on the stage model's schedule (on the ×4 model's, 0.4 is less noise than MSBD's)
    start_on: str = "stage"
    lowpass: str = "matching"
    max_side: int = 256             # the memory budget: larger stages run in tiles of this side
    overlap: int = 64               # tile overlap; the alpha ramp is half of it
    # crop a square of margin × the mask's box around it; None: the whole image
    margin: float | None = None
    seed: int = 0

    def __post_init__(self):
        for name, ok, need in (
                ("steps", _whole(self.steps, 1), "a whole number ≥ 1"),
                ("candidates", _whole(self.candidates, 1), "a whole number ≥ 1"),
                ("repaint", _whole(self.repaint, 0), "a whole number ≥ 0"),
                ("jump", _whole(self.jump, 1), "a whole number ≥ 1"),
                ("dilate", _whole(self.dilate, 0), "a whole number ≥ 0"),
                ("sr_steps", _whole(self.sr_steps, 1), "a whole number ≥ 1"),
                ("stage_steps", _whole(self.stage_steps, 1), "a whole number ≥ 1"),
                ("sr_noise_level", _whole(self.sr_noise_level, 0), "a whole number ≥ 0"),
                ("backproject", _whole(self.backproject, 0), "a whole number ≥ 0, e.g. 3"),
                ("max_side", _whole(self.max_side, 16) and self.max_side % 16 == 0,
                 "a multiple of 16, e.g. 256"),
                ("overlap", _whole(self.overlap, 0) and self.overlap < self.max_side,
                 "a whole number < max_side"),
                ("guidance", _num(self.guidance, 0), "a number ≥ 0"),
                ("sr_guidance", _num(self.sr_guidance, 0), "a number ≥ 0"),
                ("stage_guidance", self.stage_guidance is None or _num(self.stage_guidance, 0),
                 "None or a number ≥ 0"),
                ("eta", _num(self.eta, 0), "a number ≥ 0"),
                ("start", _num(self.start, 0) and self.start <= 1, "a number in [0, 1]"),
                ("tiled_start", _num(self.tiled_start, 0) and self.tiled_start <= 1,
                 "a number in [0, 1]"),
                ("margin", self.margin is None or _num(self.margin, 1), "None or a number ≥ 1"),
                ("stage_steps", all(s == 0 or int(self.stage_steps * s) >= 1
                                    for s in (self.start, self.tiled_start)),
                 "stage_steps × start ≥ 1 (at least one step from the intermediate start)"),
                ("blend", self.blend in BLENDS, f"one of {BLENDS}"),
                ("upscaler", self.upscaler in UPSCALERS, f"one of {UPSCALERS}"),
                ("stage_model", self.stage_model in STAGE_MODELS, f"one of {STAGE_MODELS}"),
                ("start_on", self.start_on in START_ON, f"one of {START_ON}"),
                ("lowpass", self.lowpass in LOWPASS, f"one of {LOWPASS}"),
                ("stage_ratio", self.stage_ratio in STAGE_RATIOS, f"one of {STAGE_RATIOS}"),
                ("rerank", self.rerank in RERANKS, f"one of {RERANKS}")):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: need {need}")

    @property
    def stage_cfg(self) -> float:
        """The CFG scale of the stages' blended diffusion."""
        if self.stage_guidance is not None:
            return self.stage_guidance
        return self.sr_guidance if self.stage_model == "sr" else self.guidance


def _whole(v, least):
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _num(v, least):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and v >= least)
