"""Metrics reports (JSON-ready dicts) and contact-sheet items of the editing and inversion
methods: plain functions of their inputs and results, for the CLI (engine.commands) and Python
callers alike."""
import torch
import torch.nn.functional as F

from . import images, metrics


def load_scorer(clip=None, model=None):
    """The CLIP scorer of checkpoint `clip`, else of model folder `model` (only the embedded model
    ships a CLIP image tower), else None."""
    if clip:
        return metrics.Scorer.from_pretrained(clip)
    try:
        return metrics.Scorer.from_pretrained(model)
    except FileNotFoundError:
        return None


def _score(scorer, x: torch.Tensor, prompt: str):
    return scorer.score(x, [prompt]).item() if scorer else None


def full_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A latent-size mask (B, 1, h, w) enlarged (nearest) to the size, dtype and device of
    `like`."""
    return F.interpolate(mask.float(), size=like.shape[-2:], mode="nearest").to(like)


def mask_image(mask: torch.Tensor):
    """A (1, 1, H, W) mask in [0, 1] as a black-and-white PIL image."""
    return images.to_pil((mask * 2 - 1).expand(-1, 3, -1, -1))[0]


def reconstruction(rec: torch.Tensor, image) -> dict:
    """PSNR and SSIM of a reconstruction `rec` in [-1, 1] to the input `image` (PIL)."""
    src = images.to_tensor(image).to(rec)
    return {"psnr": metrics.psnr(rec, src).item(), "ssim": metrics.ssim(rec, src).item()}


def edit_report(image, edited: torch.Tensor, prompts: list[str], settings: dict, *,
                scorer=None, scorer_name=None, files=None) -> dict:
    """An edit of a real image (Direct Inversion, Prompt-to-Prompt): the run's settings and, per
    edit prompt, PSNR / SSIM of the edit `edited` (B, 3, H, W) to the source `image` (PIL) and CLIP
    scores of both against the prompt."""
    src = images.to_tensor(image).to(edited).expand_as(edited)
    files = files or [None] * len(prompts)
    rows = [{"prompt": p, "file": None if f is None else str(f),
             "psnr_to_source": round(a.item(), 3), "ssim_to_source": round(b.item(), 4)}
            for p, f, a, b in zip(prompts, files, metrics.psnr(edited, src),
                                  metrics.ssim(edited, src))]
    if scorer is not None:
        for row, before, after in zip(rows, scorer.score(src.float(), prompts),
                                      scorer.score(edited.float(), prompts)):
            row.update(clip_score_source=round(before.item(), 2),
                       clip_score_edit=round(after.item(), 2))
    return {**settings, "clip_scorer": scorer_name if scorer is not None else None, "edits": rows}


def edit_lines(report: dict) -> list[str]:
    """One line per edit of an `edit_report`."""
    lines = []
    for row in report["edits"]:
        clip = (f", CLIP {row['clip_score_source']} → {row['clip_score_edit']}"
                if "clip_score_edit" in row else "")
        lines.append(f"  {row['prompt']!r}: PSNR to source {row['psnr_to_source']} dB, "
                     f"SSIM {row['ssim_to_source']}{clip}")
    return lines


def edit_sheet(image, edits, prompts: list[str], source: str, label: str) -> list:
    """Contact-sheet items of an edit: the source, then each edit (PIL) with its prompt after
    `label`."""
    return ([(image, f"source: {source or '(empty prompt)'}")] +
            [(im, f"{label}: {p}") for im, p in zip(edits, prompts)])


def iterinv_report(image, inv, sr, scorer=None, seconds=None) -> dict:
    """IterInv (engine.iterinv.Cascade.invert): reconstruction metrics of `inv` (a
    CascadeInversion) against the input `image` (PIL) at the top stage, with the ceiling set by the
    ×4 model `sr`'s VAE, PSNR of every stage and the SR solver's work."""
    from .iterinv import pyramid

    rec = inv.images[-1]
    pyr = pyramid(image, rec.shape[-1])
    truth = pyr[-1].to(rec)
    with torch.no_grad():
        ceiling = sr.decode(sr.encode(truth)).float()
    return {"prompt": inv.prompt[0], "size": rec.shape[-1], "mode": inv.method,
            "stage1": inv.stage1, "steps": inv.steps, "noise_level": inv.noise_level,
            "seed": inv.seed,
            "reconstruction": {
                "mse": metrics.mse(rec, truth).item(), "psnr": metrics.psnr(rec, truth).item(),
                "ssim": metrics.ssim(rec, truth).item(),
                "clip_score": _score(scorer, rec, inv.prompt[0]),
                "vae_ceiling_psnr": metrics.psnr(ceiling, truth).item(),
                "seconds": None if seconds is None else round(seconds, 2)},
            "stages": [{"size": im.shape[-1], "psnr": metrics.psnr(im, x.to(im)).item()}
                       for im, x in zip(inv.images, pyr)],
            "sr_solver": [{"evals": st.evals, "seconds": round(st.seconds, 2),
                           "max_one_step_error": None if st.errors is None else
                           max(e.max().item() for e in st.errors)} for st in inv.stages]}


def iterinv_sheet(image, stages) -> list:
    """Contact-sheet items of an IterInv reconstruction: the input, then every stage (PIL)."""
    return [(image, "input")] + [(p, f"stage {p.width}²") for p in stages]


def iterinv_edit_report(image, edits, mask, prompt: str, edit: str, *, inversion=None,
                        backproject=0, scorer=None, seconds=None) -> dict:
    """IterInv + DiffEdit (Cascade.edit): the top stage of `edits` against the input `image` (PIL),
    outside the DiffEdit `mask` and whole, and CLIP scores of the source and the edit against
    `edit`."""
    from .iterinv import pyramid

    top = edits[-1]
    truth = pyramid(image, top.shape[-1])[-1].to(top)
    up = full_mask(mask, top)
    inversion = None if inversion is None else str(inversion)
    return {"prompt": prompt, "edit": edit, "size": top.shape[-1], "inversion": inversion,
            "backproject": backproject, "mask_fraction": mask.float().mean().item(),
            "psnr_outside_mask": metrics.psnr(top, truth, 1 - up).item(),
            "psnr_to_source": metrics.psnr(top, truth).item(),
            "clip_score_source": _score(scorer, truth, edit),
            "clip_score_edit": _score(scorer, top, edit),
            "seconds": None if seconds is None else round(seconds, 2)}


def iterinv_edit_sheet(image, mask, edits, prompt: str, edit: str) -> list:
    """Contact-sheet items of an IterInv edit: the source, the mask and every edited stage (PIL)."""
    return ([(image, f"source: {prompt}"), (mask, "DiffEdit mask")] +
            [(p, f"edit {p.width}²: {edit}") for p in edits])


def blend_report(image: torch.Tensor, res, prompt: str, opts, scorer=None, seconds=None) -> dict:
    """Multi-stage blended diffusion (engine.blended.MultiStage.edit): how far the edit `res` (a
    Result) strays from the source `image` (1, 3, H, W) outside the mask, CLIP scores, the reranked
    candidates' scores and each stage's log."""
    src = image.float().cpu()
    edit = res.image.float().cpu()
    outside = (edit - src).abs().mul(1 - res.mask.cpu()).max().item()
    return {"prompt": prompt, "size": src.shape[-1], "options": vars(opts), "box": res.box,
            "mask_fraction": res.mask.mean().item(), "outside_mask_max_abs_diff": outside,
            "clip_score_source": _score(scorer, src, prompt),
            "clip_score_edit": _score(scorer, edit, prompt), "candidate_clip_scores": res.scores,
            "chosen": res.chosen, "stages": res.log,
            "seconds": None if seconds is None else round(seconds, 2)}


def blend_sheet(image, edit, res, prompt: str) -> list:
    """Contact-sheet items of a blended edit: the input and the edit (PIL), the mask and every
    stage of `res`."""
    stages = [(images.to_pil(s.float().cpu())[0], f"stage {k}: {s.shape[-1]}x{s.shape[-1]}")
              for k, s in enumerate(res.stages, 1)]
    return [(image, "input"), (mask_image(res.mask.cpu()), "mask"), *stages,
            (edit, f"edit: {prompt}")]
