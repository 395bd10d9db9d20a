"""`python -m engine invert|edit`: every input and output path checked before any work, every file written whole."""
import json
import time
from pathlib import Path

import torch

from . import images, metrics
from .profile import profiled


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: the prompt file has no prompts; write one edit prompt per line")
    return prompts


def _scorer(args):
    if args.clip:
        return metrics.Scorer.from_pretrained(args.clip)
    try:
        return metrics.Scorer.from_pretrained(args.model)
    except FileNotFoundError:
        return None  # of the models, only the embedded one ships a CLIP image tower


def run(args) -> list[Path]:
    import engine

    image = images.load(args.image)
    t0 = time.perf_counter()
    if args.command == "invert":
        out = Path(args.out)
        if out.suffix != ".safetensors" or not out.parent.is_dir():
            raise ValueError(f"{out}: need a .safetensors path in an existing folder for the trajectory")
        rec_path, _ = images.check_out(args.reconstruction or out.with_suffix(".png"))
        with profiled(args.profile):
            pipe = engine.load(args.model, dtype=args.dtype, device=args.device, variant=args.variant,
                               config=args.config, prediction_type=args.prediction_type)
            traj = pipe.invert(image, args.prompt, args.steps, args.convention, args.null_text, args.guidance,
                               progress=not args.quiet)
            rec = pipe.reconstruct(traj, args.prompt, output="pt", progress=not args.quiet)
        src = images.to_tensor(image).to(rec)
        written = [traj.save(out, {"prompt": args.prompt, "image": str(args.image)}),
                   images.save(images.to_pil(rec)[0], rec_path)]
        print(f"wrote {out} ({traj.steps} steps, {traj.convention}"
              f"{', null-text ' + args.null_text if args.null_text else ''}) and {rec_path}: reconstruction "
              f"PSNR {metrics.psnr(rec, src).item():.2f} dB, SSIM {metrics.ssim(rec, src).item():.4f} "
              f"({time.perf_counter() - t0:.1f}s)")
        return written

    prompts = _prompts(args)
    out, _ = images.check_out(args.out)
    outs = [out] if len(prompts) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(prompts))]
    sheet_path, json_path = out.with_name(f"{out.stem}_sheet.png"), out.with_suffix(".json")
    with profiled(args.profile):
        pipe = engine.load(args.model, dtype=args.dtype, device=args.device, variant=args.variant,
                           config=args.config, prediction_type=args.prediction_type)
        edited, _ = pipe.edit(image, prompts, args.source, args.steps, args.guidance, args.lam, args.inject_steps,
                              args.every, args.negative, args.convention, output="pt", progress=not args.quiet)
    src = images.to_tensor(image).to(edited).expand_as(edited)
    scorer = _scorer(args)
    rows = [{"prompt": p, "file": str(o), "psnr_to_source": round(a.item(), 3), "ssim_to_source": round(b.item(), 4)}
            for p, o, a, b in zip(prompts, outs, metrics.psnr(edited, src), metrics.ssim(edited, src))]
    if scorer is not None:
        for row, before, after in zip(rows, scorer.score(src.float(), prompts), scorer.score(edited.float(), prompts)):
            row.update(clip_score_source=round(before.item(), 2), clip_score_edit=round(after.item(), 2))
    report = {"image": str(args.image), "source": args.source, "steps": args.steps, "guidance": args.guidance,
              "lambda": args.lam, "inject_steps": args.inject_steps, "every": args.every,
              "convention": args.convention, "clip_scorer": args.clip or (args.model if scorer else None),
              "edits": rows}
    pils = images.to_pil(edited)
    sheet = images.contact_sheet([(image, f"source: {args.source or '(empty prompt)'}")] +
                                 [(im, f"lambda {args.lam}: {p}") for im, p in zip(pils, prompts)],
                                 columns=min(4, len(prompts) + 1))
    written = [images.save(im, o) for im, o in zip(pils, outs)]
    written.append(images.save(sheet, sheet_path))
    written.append(images.write_atomic(json_path, lambda f: f.write(json.dumps(report, indent=2).encode())))
    print(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - t0:.1f}s)")
    for row in rows:
        clip = f", CLIP {row['clip_score_source']} → {row['clip_score_edit']}" if scorer else ""
        print(f"  {row['prompt']!r}: PSNR to source {row['psnr_to_source']} dB, SSIM {row['ssim_to_source']}{clip}")
    return written
