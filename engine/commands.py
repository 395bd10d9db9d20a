"""The commands of `python -m engine` (engine.cli parses them): each checks its inputs and outputs
before any work, calls the Python API, builds its report (engine.reports), writes every file whole
and prints a summary."""
import dataclasses
import json
import time
from pathlib import Path

import engine

from . import (checkpoints, demo as demos, diffedit, direct, images, invert as inv, ksample,
               lora, multires, prompt, regions, reports, rng, tiles)
from .blended import MultiStage, Options, check_scorer
from .iterinv import Cascade, CascadeInversion, pyramid
from .p2p import replaced_steps
from .profile import profiled
from .sample import check_args, check_fraction


def _load(a, path=None) -> engine.Pipeline:
    """The command's model with its LoRAs, or its ×4 stage `path` (same dtype, device, variant,
    pseudo-words; no LoRAs); a server's loaded ones when `a` has its `loader` (engine.serve)."""
    if getattr(a, "loader", None) is not None:
        return a.loader(path)
    words = {k: getattr(a, k) for k in ("embeddings", "semi", "max_memory") if hasattr(a, k)}
    if path is not None:
        return engine.load(path, dtype=a.dtype, device=a.device, variant=a.variant, **words)
    loras = dict(loras=getattr(a, "lora", ()), lora_dir=getattr(a, "lora_dir", None),
                 lora_strict=getattr(a, "lora_strict", True))
    return engine.load(a.model, dtype=a.dtype, device=a.device, variant=a.variant, config=a.config,
                       prediction_type=a.prediction_type, tokenizer=a.tokenizer, **loras, **words)


def _words(a, *texts):
    """The prompts' syntax, pseudo-words and <lora:…> tags, against the --embeddings files (read
    here too) and --lora-dir, and the --lora files, so that a bad prompt or file fails before the
    model loads."""
    texts = [t for t in texts if t is not None]
    concepts = {c.name: c for path in a.embeddings for c in multires.load_concepts(path)}
    prompt.check(texts, concepts)
    for name in prompt.lora_tags(texts):
        lora.find(a.lora_dir, name)
    for path, _ in a.lora:
        checkpoints.check_tensors(Path(path), "LoRA")


def _fields(cls, a, **renamed) -> dict:
    """The fields of dataclass `cls` read from the namespace `a` (field=flag dest in `renamed`)."""
    return {f.name: getattr(a, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)
            if hasattr(a, renamed.get(f.name, f.name))}


def _json(path, report) -> Path:
    return images.write_atomic(path, lambda f: f.write(json.dumps(report, indent=2).encode()))


def _tensors_out(path, what="") -> Path:
    out = Path(path)
    if out.suffix != ".safetensors" or not out.parent.is_dir():
        raise ValueError(f"{out}: need a .safetensors path in an existing folder{what}")
    return images.check_target(out)


def _sample(a, call, source=None) -> Path:
    out, _ = images.check_out(a.out)
    check_args(a.steps, a.guidance, a.eta)
    ksample.pick(a.sampler, a.schedule, a.eta)
    rng.check_seed(a.seed)
    _words(a, a.prompt, a.negative)
    # a missing or unreadable input fails before the model loads
    if source is None and getattr(a, "image", None) is not None:
        source = images.load(a.image)
    with profiled(a.profile):
        t0 = time.perf_counter()
        pipe = _load(a)
        t_load = time.perf_counter() - t0
        image = call(pipe, source, dict(negative=a.negative, steps=a.steps, guidance=a.guidance,
                                        seed=a.seed, eta=a.eta, sampler=a.sampler,
                                        schedule=a.schedule, progress=not a.quiet))[0]
    images.save(image, out)
    print(f"wrote {out} ({image.width}×{image.height}; load {t_load:.1f}s, "
          f"total {time.perf_counter() - t0:.1f}s)")
    return out


def generate(a) -> Path:
    images.check_size(a.height, a.width)
    return _sample(a, lambda p, _, kw: p.generate(a.prompt, height=a.height, width=a.width, **kw))


def img2img(a) -> Path:
    check_fraction("strength", a.strength, "; 1 ignores the image")
    return _sample(a, lambda p, src, kw: p.img2img(src, a.prompt, strength=a.strength, **kw))


def inpaint(a) -> Path:
    check_fraction("strength", a.strength, "; 1 starts from pure noise")
    image, mask = images.load(a.image), images.load(a.mask)
    regions.check_mask_shape(image.size[::-1], mask.size[::-1], a.mask)
    return _sample(a, lambda p, src, kw: p.inpaint(src, mask, a.prompt, strength=a.strength, **kw),
                   source=image)


def upscale(a) -> Path:
    tiles.check(a.tile, a.overlap, 8)
    images.check_backproject(a.backproject)
    return _sample(a, lambda p, src, kw: p.upscale(src, a.prompt, noise_level=a.noise_level,
                                                   tile=a.tile, overlap=a.overlap,
                                                   backproject=a.backproject, **kw))


def invert(a) -> list[Path]:
    image = images.load(a.image)
    t0 = time.perf_counter()
    out = _tensors_out(a.out, " for the trajectory")
    rec_path, _ = images.check_out(a.reconstruction or out.with_suffix(".png"))
    check_args(a.steps, a.guidance)
    inv.check_null_text(a.null_text, a.guidance)
    _words(a, a.prompt)
    with profiled(a.profile):
        pipe = _load(a)
        traj = pipe.invert(image, a.prompt, a.steps, a.convention, a.null_text, a.guidance,
                           progress=not a.quiet)
        rec = pipe.reconstruct(traj, a.prompt, output="pt", progress=not a.quiet)
    r = reports.reconstruction(rec, image)
    written = [traj.save(out, {"prompt": a.prompt, "image": str(a.image)}),
               images.save(images.to_pil(rec)[0], rec_path)]
    print(f"wrote {out} ({traj.steps} steps, {traj.convention}"
          f"{', null-text ' + a.null_text if a.null_text else ''}) and {rec_path}: reconstruction "
          f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f} ({time.perf_counter() - t0:.1f}s)")
    return written


def _prompts(a) -> list[str]:
    if a.prompt is not None:
        return [a.prompt]
    path = Path(a.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: the prompt file has no prompts; write one edit prompt per line")
    return prompts


def edit(a) -> list[Path]:
    image, t0, prompts, out, outs = _edit_job(a)
    direct.check_lambda(a.lam)
    direct.check_pairing(a.pairing)
    direct.injected_steps(a.steps, a.inject_steps, a.every)
    _words(a, *prompts, a.source, a.negative)
    scorer = reports.load_scorer(a.clip, a.model)
    with profiled(a.profile):
        edited, _ = _load(a).edit(image, prompts, a.source, a.steps, a.guidance, a.lam,
                                  a.inject_steps, a.every, a.negative, a.convention, output="pt",
                                  progress=not a.quiet, pairing=a.pairing)
    settings = {"source": a.source, "steps": a.steps, "guidance": a.guidance, "lambda": a.lam,
                "inject_steps": a.inject_steps, "every": a.every, "convention": a.convention,
                "pairing": a.pairing}
    return _edits(a, image, edited, prompts, out, outs, settings, f"lambda {a.lam}", scorer, t0)


def p2p(a) -> list[Path]:
    image, t0, prompts, out, outs = _edit_job(a)
    null_text = None if a.null_text == "none" else a.null_text
    inv.check_null_text(null_text, a.guidance)
    replaced_steps(a.steps, a.cross, a.self_attention)
    _words(a, *prompts, a.source)
    scorer = reports.load_scorer(a.clip, a.model)
    with profiled(a.profile):
        edited, _ = _load(a).prompt_to_prompt(image, prompts, a.source, a.steps, a.guidance,
                                              a.cross, a.self_attention, null_text, output="pt",
                                              progress=not a.quiet)
    settings = {"method": "prompt-to-prompt", "source": a.source, "steps": a.steps,
                "guidance": a.guidance, "cross": a.cross, "self_attention": a.self_attention,
                "null_text": null_text}
    return _edits(a, image, edited, prompts, out, outs, settings, "P2P", scorer, t0)


def _edit_job(a):
    """edit's and p2p's input image, start time, edit prompts, OUT and the file of each edit (OUT
    itself, or OUT_0, OUT_1, …), checked with the steps and guidance."""
    image, t0, prompts = images.load(a.image), time.perf_counter(), _prompts(a)
    out, _ = images.check_out(a.out)
    check_args(a.steps, a.guidance)
    outs = [out] if len(prompts) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                            for i in range(len(prompts))]
    return image, t0, prompts, out, outs


def _edits(a, image, edited, prompts, out, outs, settings, label, scorer, t0) -> list[Path]:
    """Write the edits, their before/after sheet (OUT_sheet.png) and report (OUT.json)."""
    report = {"image": str(a.image), **reports.edit_report(
        image, edited, prompts, settings, scorer=scorer, scorer_name=a.clip or a.model,
        files=outs)}
    pils = images.to_pil(edited)
    sheet = reports.edit_sheet(image, pils, prompts, a.source, label)
    sheet_path, json_path = out.with_name(f"{out.stem}_sheet.png"), out.with_suffix(".json")
    written = [images.save(im, o) for im, o in zip(pils, outs)]
    written += [images.save(images.contact_sheet(sheet, columns=min(4, len(sheet))), sheet_path),
                _json(json_path, report)]
    print(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - t0:.1f}s)")
    print("\n".join(reports.edit_lines(report)))
    return written


def _cascade_inputs(a, *prompts):
    """The input image and the output folder of iterinv / iterinv-edit, checked before any work
    with the settings and prompts."""
    image = images.load(a.image)
    out = images.check_target(a.out, folder=True)
    pyramid(image, a.size)  # checks the image and the size
    check_args(a.steps, a.guidance)
    inv.check_null_text(a.stage1 if a.stage1 in inv.NULL_TEXT_METHODS else None, a.guidance)
    rng.check_seed(a.seed)
    tiles.check(a.tile, a.overlap)
    _words(a, a.prompt, *prompts)
    _check_models(a)
    return image, out


def _check_models(a):
    """The base model's and its ×4 stage's paths, before either (or a CLIP scorer) loads."""
    for path in (a.model, a.upscaler):
        checkpoints.check_path(path)


def _models(a, *fields):
    """The base model, with the LoRAs the prompts in `a`'s `fields` name, and its ×4 stage; the
    prompts lose their <lora:…> tags, which the ×4 stage does not take."""
    base = _load(a).model
    base.use_prompt_loras([getattr(a, f) for f in fields])
    for f in fields:
        if getattr(a, f) is not None:
            setattr(a, f, prompt.strip_loras(getattr(a, f)))
    return base, _load(a, a.upscaler).model


def _cascade(a, *fields) -> Cascade:
    return Cascade(*_models(a, "prompt", *fields), a.tile, a.overlap)


def _invert_cascade(a, cas: Cascade, image):
    return cas.invert(image, a.prompt, a.size, a.mode, a.stage1, a.steps, a.guidance, a.noise_level,
                      a.seed, not a.quiet)


def _finish(out: Path, written: list, sheet: list, name: str, report: dict) -> list[Path]:
    written.append(images.save(images.contact_sheet(sheet, columns=len(sheet)), out / "sheet.png"))
    written.append(_json(out / name, report))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return written


def iterinv(a) -> list[Path]:
    image, out = _cascade_inputs(a)
    scorer = reports.load_scorer(a.clip, a.model)
    t0 = time.perf_counter()
    with profiled(a.profile):
        cas = _cascade(a)
        inv = _invert_cascade(a, cas, image)
    seconds = time.perf_counter() - t0
    images.make_folder(out)
    report = {"image": str(a.image), **reports.iterinv_report(image, inv, cas.sr, scorer, seconds)}
    pils = [images.to_pil(im)[0] for im in inv.images]
    written = [inv.save(out / "inversion.safetensors"),
               images.save(pils[-1], out / "reconstruction.png")]
    written += [images.save(p, out / f"stage_{p.width}.png") for p in pils[:-1]]
    r = report["reconstruction"]
    print(f"reconstruction at {a.size}²: PSNR {r['psnr']:.2f} dB (VAE ceiling "
          f"{r['vae_ceiling_psnr']:.2f}), SSIM {r['ssim']:.4f}, MSE {r['mse']:.2e} "
          f"({seconds:.1f}s)")
    return _finish(out, written, reports.iterinv_sheet(image, pils), "metrics.json", report)


def _inversion_stages(a):
    """The SR stages of --inversion, checked to have been made with this command's settings."""
    meta, stages = CascadeInversion.load_stages(a.inversion)
    made = {"size": meta["sizes"][-1], "steps": int(meta["steps"]),
            "noise_level": int(meta["noise_level"])}
    asked = {"size": a.size, "steps": a.steps, "noise_level": a.noise_level}
    if made != asked:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in made.items())
        raise ValueError(f"{a.inversion} was made with {flags}; edit with the same settings or "
                         "invert again")
    return stages


def iterinv_edit(a) -> list[Path]:
    image, out = _cascade_inputs(a, a.edit)
    check_args(a.steps, a.edit_guidance)
    check_fraction("strength", a.strength)
    diffedit.check_mask(a.mask_strength, a.mask_ratio)
    images.check_backproject(a.backproject)
    stages = _inversion_stages(a) if a.inversion else None
    scorer = reports.load_scorer(a.clip, a.model)
    t0 = time.perf_counter()
    with profiled(a.profile):
        cas = _cascade(a, "edit")
        stages = stages or _invert_cascade(a, cas, image).stages
        edits, mask = cas.edit(image, a.prompt, a.edit, stages, a.noise_level, a.steps,
                               a.edit_guidance, a.strength, mask_strength=a.mask_strength,
                               mask_ratio=a.mask_ratio, seed=a.seed, backproject=a.backproject,
                               progress=not a.quiet)
    seconds = time.perf_counter() - t0
    images.make_folder(out)
    report = {"image": str(a.image), **reports.iterinv_edit_report(
        image, edits, mask, a.prompt, a.edit, inversion=a.inversion, backproject=a.backproject,
        scorer=scorer, seconds=seconds)}
    pils = [images.to_pil(im)[0] for im in edits]
    mask_pil = reports.mask_image(reports.full_mask(mask, edits[-1]))
    written = [images.save(pils[-1], out / "edit.png"), images.save(mask_pil, out / "mask.png")]
    written += [images.save(p, out / f"edit_{p.width}.png") for p in pils[:-1]]
    print(f"edit at {a.size}²: PSNR outside the mask {report['psnr_outside_mask']:.2f} dB, mask "
          f"covers {100 * report['mask_fraction']:.1f}% ({seconds:.1f}s)")
    sheet = reports.iterinv_edit_sheet(image, mask_pil, pils, a.prompt, a.edit)
    return _finish(out, written, sheet, "edit.json", report)


def _blend_inputs(a):
    """The image and mask of `blend`, resized to --size."""
    image, mask = images.load(a.image), images.load(a.mask)
    (w, h), (mw, mh) = image.size, mask.size
    regions.check_mask_shape((h, w), (mh, mw), a.mask)
    regions.check_square(h, w, a.margin, a.image)
    if a.size is not None:
        if a.size < 16 or a.size % 16 or image.width != image.height:
            raise ValueError(f"--size {a.size} with a {image.width}×{image.height} image: need a "
                             "square image and a multiple of 16")
        if a.size * a.size > images.MAX_PIXELS:
            raise ValueError(f"--size {a.size}: over the limit of {images.MAX_PIXELS // 10**6} "
                             "megapixels; pass a smaller size")
        if mask.size == image.size:  # a mask of another size is left to the edit's own check
            mask = mask.resize((a.size, a.size), images.Image.NEAREST)
        image = image.resize((a.size, a.size), images.Image.LANCZOS)
    return image, mask


def blend(a) -> list[Path]:
    out, _ = images.check_out(a.out)
    opts = Options(**_fields(Options, a, upscaler="upscale_with"))
    rng.check_seed(a.seed)
    image, mask = _blend_inputs(a)
    _words(a, a.prompt)
    _check_models(a)
    scorer = reports.load_scorer(a.clip, a.model)
    check_scorer(scorer, opts)
    t0 = time.perf_counter()
    with profiled(a.profile):
        base, sr = _models(a, "prompt")
        res = MultiStage(base, sr, scorer).edit(images.to_tensor(image).to(base.device), mask,
                                                a.prompt, opts, progress=not a.quiet)
    seconds = time.perf_counter() - t0
    report = {"image": str(a.image), "mask": str(a.mask), **reports.blend_report(
        images.to_tensor(image), res, a.prompt, opts, scorer, seconds)}
    pil = images.to_pil(res.image.float().cpu())[0]
    sheet = reports.blend_sheet(image, pil, res, a.prompt)
    sheet_path, json_path = out.with_name(f"{out.stem}_sheet.png"), out.with_suffix(".json")
    written = [images.save(pil, out),
               images.save(images.contact_sheet(sheet, columns=min(len(sheet), 4)), sheet_path),
               _json(json_path, report)]
    outside = report["outside_mask_max_abs_diff"]
    off = "the source, pixel for pixel" if outside == 0 else f"off by up to {outside:.2e}"
    if out.suffix.lower() in images.LOSSY:
        off += f" before {out.suffix} compression, which changes it (use .png to keep it exact)"
    print(f"wrote {', '.join(map(str, written))}: {image.width}² edit in {seconds:.1f}s; outside "
          f"the mask the image is {off}")
    return written


def train_ti(a) -> list[Path]:
    out = _tensors_out(a.out)
    cfg = multires.TrainConfig(**_fields(multires.TrainConfig, a))
    cfg.check()
    images.check_size(a.resolution, a.resolution, ("resolution", "resolution"))
    multires.load_images(a.images, 8)  # the folder and every image, before the model loads
    t0 = time.perf_counter()
    with profiled(a.profile):
        pipe = _load(a)
        side = pipe.model.size(a.resolution, a.resolution)[0]
        pixels = multires.load_images(a.images, side, a.center_crop)
        ckpt = out.with_suffix(".ckpt.safetensors")
        if ckpt.is_file() and not a.quiet:
            print(f"resuming from {ckpt}")
        try:
            multires.train(pipe.model, pixels, cfg, out, ckpt, progress=not a.quiet)
        except KeyboardInterrupt as e:
            e.hint = (f"rerun the same command to resume from {ckpt}" if ckpt.is_file() else
                      "no checkpoint yet")
            raise
    print(f"wrote {out}: <{a.token}> with {a.bins} time bins from {pixels.shape[0]} images at "
          f"{side}², {a.steps} steps in {time.perf_counter() - t0:.1f}s")
    return [out]


def export_ti(a) -> list[Path]:
    out = _tensors_out(a.out)
    concept = multires.load_concepts(a.embeddings)[0]
    if not concept.multires:
        raise ValueError(f"{a.embeddings}: an ordinary embedding already; export-ti reads train-ti "
                         "files")
    multires.export_row(concept, a.row, out, a.token)
    print(f"wrote {out}: row {a.row} of <{concept.name}> as {a.token or f'<{concept.name}>'}")
    return [out]


def serve(a):
    try:
        from . import serve as server
    except ImportError as e:  # one line, as every setup error
        raise ValueError(f"serve needs the extra engine[serve] ({e.name} is missing): "
                         "pip install -e \".[serve]\"") from None
    checkpoints.check_path(a.model)
    checkpoints.check_path(a.upscaler)
    server.main(a)


def demo(a) -> list[Path]:
    return demos.run(a.out, a.steps, a.sr_steps, seed=a.seed, progress=not a.quiet)


HANDLERS = {"generate": generate, "img2img": img2img, "inpaint": inpaint, "upscale": upscale,
            "invert": invert, "edit": edit, "p2p": p2p, "iterinv": iterinv,
            "iterinv-edit": iterinv_edit, "blend": blend, "train-ti": train_ti,
            "export-ti": export_ti, "serve": serve, "demo": demo}
