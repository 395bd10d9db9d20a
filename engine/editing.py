"""`python -m engine invert|edit`: every input and output path checked before any work, every file written whole."""
import json
import sys
import time
from pathlib import Path

import torch

from . import images, metrics
from .profile import profiled


def _load(args, path=None):
    """The model of a command (or `path`, its ×4 stage: same dtype, device, variant and pseudo-words)."""
    import engine

    if path is not None:
        return engine.load(path, dtype=args.dtype, device=args.device, variant=args.variant,
                           embeddings=args.embeddings, semi=args.semi)
    return engine.load(args.model, dtype=args.dtype, device=args.device, variant=args.variant, config=args.config,
                       prediction_type=args.prediction_type, embeddings=getattr(args, "embeddings", ()),
                       semi=getattr(args, "semi", "zero"))


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
    image = images.load(args.image)
    t0 = time.perf_counter()
    if args.command == "invert":
        out = Path(args.out)
        if out.suffix != ".safetensors" or not out.parent.is_dir():
            raise ValueError(f"{out}: need a .safetensors path in an existing folder for the trajectory")
        rec_path, _ = images.check_out(args.reconstruction or out.with_suffix(".png"))
        with profiled(args.profile):
            pipe = _load(args)
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
        pipe = _load(args)
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
    written.append(_json(json_path, report))
    print(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - t0:.1f}s)")
    for row in rows:
        clip = f", CLIP {row['clip_score_source']} → {row['clip_score_edit']}" if scorer else ""
        print(f"  {row['prompt']!r}: PSNR to source {row['psnr_to_source']} dB, SSIM {row['ssim_to_source']}{clip}")
    return written


def _scene_out(folder) -> Path:
    out = Path(folder)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: its parent folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; --out names the folder the results go to")
    return out


def _json(path, report) -> Path:
    return images.write_atomic(path, lambda f: f.write(json.dumps(report, indent=2).encode()))


def run_iterinv(args) -> list[Path]:
    """`iterinv`: the cascade inversion, its reconstruction, a metrics JSON. `iterinv-edit`: IterInv + DiffEdit."""
    from .iterinv import Cascade, CascadeInversion, pyramid

    image = images.load(args.image)
    out = _scene_out(args.out)
    pyr = pyramid(image, args.size)  # checks the image and the size before any work
    if args.command == "iterinv-edit":
        images.check_backproject(args.backproject)
    stages = None
    if args.command == "iterinv-edit" and args.inversion:
        meta, stages = CascadeInversion.load_stages(args.inversion)
        made = {"size": meta["sizes"][-1], "steps": int(meta["steps"]), "noise_level": int(meta["noise_level"])}
        asked = {"size": args.size, "steps": args.steps, "noise_level": args.noise_level}
        if made != asked:
            raise ValueError(f"{args.inversion} was made with " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                             made.items()) + "; edit with the same settings or invert again")
    t0 = time.perf_counter()
    with profiled(args.profile):
        base = _load(args)
        sr = _load(args, args.upscaler)
        cas = Cascade(base.model, sr.model, args.tile, args.overlap)
        progress = not args.quiet
        if args.command == "iterinv" or stages is None:
            inv = cas.invert(image, args.prompt, args.size, args.mode, args.stage1, args.steps, args.guidance,
                             args.noise_level, args.seed, progress)
            stages = inv.stages
        if args.command == "iterinv-edit":
            edits, mask = cas.edit(image, args.prompt, args.edit, stages, args.noise_level, args.steps,
                                   args.edit_guidance, args.strength, mask_strength=args.mask_strength,
                                   mask_ratio=args.mask_ratio, seed=args.seed, backproject=args.backproject,
                                   progress=progress)
    seconds = time.perf_counter() - t0
    truth = pyr[-1].to(edits[-1] if args.command == "iterinv-edit" else inv.images[-1])
    out.mkdir(exist_ok=True)
    scorer = _scorer(args)
    if args.command == "iterinv":
        rec = inv.images[-1]
        with torch.no_grad():
            ceiling = cas.sr.decode(cas.sr.encode(truth)).float()
        report = {"image": str(args.image), "prompt": args.prompt, "size": args.size, "mode": args.mode,
                  "stage1": args.stage1, "steps": args.steps, "noise_level": args.noise_level, "seed": args.seed,
                  "reconstruction": {
                      "mse": metrics.mse(rec, truth).item(), "psnr": metrics.psnr(rec, truth).item(),
                      "ssim": metrics.ssim(rec, truth).item(),
                      "clip_score": scorer.score(rec, [args.prompt]).item() if scorer else None,
                      "vae_ceiling_psnr": metrics.psnr(ceiling, truth).item(), "seconds": round(seconds, 2)},
                  "stages": [{"size": im.shape[-1], "psnr": metrics.psnr(im, x.to(im)).item()}
                             for im, x in zip(inv.images, pyr)],
                  "sr_solver": [{"evals": st.evals, "seconds": round(st.seconds, 2),
                                 "max_one_step_error": None if st.errors is None else
                                 max(e.max().item() for e in st.errors)} for st in inv.stages]}
        pils = [images.to_pil(im)[0] for im in inv.images]
        written = [inv.save(out / "inversion.safetensors"), images.save(pils[-1], out / "reconstruction.png")]
        written += [images.save(p, out / f"stage_{p.width}.png") for p in pils[:-1]]
        sheet = [(image, "input")] + [(p, f"stage {p.width}²") for p in pils]
        r = report["reconstruction"]
        print(f"reconstruction at {args.size}²: PSNR {r['psnr']:.2f} dB (VAE ceiling {r['vae_ceiling_psnr']:.2f}), "
              f"SSIM {r['ssim']:.4f}, MSE {r['mse']:.2e} ({seconds:.1f}s)")
    else:
        edit = edits[-1]
        up = torch.nn.functional.interpolate(mask.float(), size=edit.shape[-2:], mode="nearest").to(edit)
        report = {"image": str(args.image), "prompt": args.prompt, "edit": args.edit, "size": args.size,
                  "inversion": args.inversion, "backproject": args.backproject,
                  "mask_fraction": mask.float().mean().item(),
                  "psnr_outside_mask": metrics.psnr(edit, truth, 1 - up).item(),
                  "psnr_to_source": metrics.psnr(edit, truth).item(),
                  "clip_score_source": scorer.score(truth, [args.edit]).item() if scorer else None,
                  "clip_score_edit": scorer.score(edit, [args.edit]).item() if scorer else None,
                  "seconds": round(seconds, 2)}
        pils = [images.to_pil(im)[0] for im in edits]
        mask_pil = images.to_pil((up * 2 - 1).expand(-1, 3, -1, -1))[0]
        written = [images.save(pils[-1], out / "edit.png"), images.save(mask_pil, out / "mask.png")]
        written += [images.save(p, out / f"edit_{p.width}.png") for p in pils[:-1]]
        sheet = [(image, f"source: {args.prompt}"), (mask_pil, "DiffEdit mask")] + \
                [(p, f"edit {p.width}²: {args.edit}") for p in pils]
        print(f"edit at {args.size}²: PSNR outside the mask {report['psnr_outside_mask']:.2f} dB, mask covers "
              f"{100 * report['mask_fraction']:.1f}% ({seconds:.1f}s)")
    written.append(images.save(images.contact_sheet(sheet, columns=len(sheet)), out / "sheet.png"))
    written.append(_json(out / ("metrics.json" if args.command == "iterinv" else "edit.json"), report))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return written


def run_blend(args) -> list[Path]:
    """`blend`: the multi-stage blended-diffusion edit, a contact sheet of its stages and a metrics JSON."""
    from .blended import MultiStage, Options

    out, _ = images.check_out(args.out)
    sheet_path, json_path = out.with_name(f"{out.stem}_sheet.png"), out.with_suffix(".json")
    opts = Options(steps=args.steps, guidance=args.guidance, eta=args.eta, candidates=args.candidates,
                   rerank=args.rerank, repaint=args.repaint, jump=args.jump, blend=args.blend, dilate=args.dilate,
                   upscaler=args.upscale_with, sr_steps=args.sr_steps, backproject=args.backproject,
                   stage_model=args.stage_model, stage_steps=args.stage_steps, start=args.start,
                   tiled_start=args.tiled_start, max_side=args.max_side, overlap=args.overlap, margin=args.margin,
                   seed=args.seed)
    image, mask = images.load(args.image), images.load(args.mask)
    if args.size is not None:
        if args.size < 16 or args.size % 16 or image.width != image.height:
            raise ValueError(f"--size {args.size} with a {image.width}×{image.height} image: need a square image "
                             "and a multiple of 16")
        if mask.size == image.size:  # a mask of another size is left to the edit's own check
            mask = mask.resize((args.size, args.size), images.Image.NEAREST)
        image = image.resize((args.size, args.size), images.Image.LANCZOS)
    t0 = time.perf_counter()
    with profiled(args.profile):
        base = _load(args)
        sr = _load(args, args.upscaler)
        scorer = _scorer(args)
        res = MultiStage(base.model, sr.model, scorer).edit(images.to_tensor(image).to(base.model.device), mask, args.prompt, opts,
                                                progress=not args.quiet)
    seconds = time.perf_counter() - t0
    src = images.to_tensor(image)
    edit = res.image.float().cpu()
    outside = (edit - src).abs().mul(1 - res.mask.cpu()).max().item()
    report = {"image": str(args.image), "mask": str(args.mask), "prompt": args.prompt, "size": image.width,
              "options": vars(opts), "box": res.box, "mask_fraction": res.mask.mean().item(),
              "outside_mask_max_abs_diff": outside,
              "clip_score_source": scorer.score(src, [args.prompt]).item() if scorer else None,
              "clip_score_edit": scorer.score(edit, [args.prompt]).item() if scorer else None,
              "candidate_clip_scores": res.scores, "chosen": res.chosen, "stages": res.log,
              "seconds": round(seconds, 2)}
    pil = images.to_pil(edit)[0]
    mask_pil = images.to_pil((res.mask.cpu() * 2 - 1).expand(-1, 3, -1, -1))[0]
    stages = [(images.to_pil(s.float().cpu())[0], f"stage {k}: {s.shape[-1]}x{s.shape[-1]}")
              for k, s in enumerate(res.stages, 1)]
    sheet = [(image, "input"), (mask_pil, "mask"), *stages, (pil, f"edit: {args.prompt}")]
    written = [images.save(pil, out), images.save(images.contact_sheet(sheet, columns=min(len(sheet), 4)), sheet_path),
               _json(json_path, report)]
    print(f"wrote {', '.join(map(str, written))}: {image.width}² edit in {seconds:.1f}s; outside the mask the "
          f"image is {'the source, pixel for pixel' if outside == 0 else f'off by up to {outside:.2e}'}")
    return written


def run_ti(args) -> list[Path]:
    """`train-ti`: learn a multiresolution concept from a folder of images; `export-ti`: one row of it."""
    from . import multires

    out = Path(args.out)
    if out.suffix != ".safetensors" or not out.parent.is_dir():
        raise ValueError(f"{out}: need a .safetensors path in an existing folder")
    if args.command == "export-ti":
        concepts = multires.load_concepts(args.embeddings)
        if not concepts[0].multires:
            raise ValueError(f"{args.embeddings}: an ordinary embedding already; export-ti reads train-ti files")
        multires.export_row(concepts[0], args.row, out, args.token)
        print(f"wrote {out}: row {args.row} of <{concepts[0].name}> as {args.token or f'<{concepts[0].name}>'}")
        return [out]
    cfg = multires.TrainConfig(args.token, args.init_token, args.bins, args.steps, args.batch, args.lr,
                               args.weight_decay, args.templates, args.flip, args.seed, args.checkpoint_every)
    cfg.check()
    t0 = time.perf_counter()
    with profiled(args.profile):
        pipe = _load(args)
        side = pipe.model.size(args.resolution, args.resolution)[0]
        pixels = multires.load_images(args.images, side, args.center_crop)
        ckpt = out.with_suffix(".ckpt.safetensors")
        if ckpt.is_file() and not args.quiet:
            print(f"resuming from {ckpt}")
        try:
            multires.train(pipe.model, pixels, cfg, out, ckpt, progress=not args.quiet)
        except KeyboardInterrupt:
            kept = f"rerun the same command to resume from {ckpt}" if ckpt.is_file() else "no checkpoint yet"
            print(f"interrupted: {kept}", file=sys.stderr)
            raise SystemExit(130) from None
    print(f"wrote {out}: <{args.token}> with {args.bins} time bins from {pixels.shape[0]} images at {side}², "
          f"{args.steps} steps in {time.perf_counter() - t0:.1f}s")
    return [out]
