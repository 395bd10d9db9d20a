"""Multiresolution textual inversion on the embedded model, read from the pixels.

    python bench/bench_multires.py --part model   # does tiny-stripes draw stripes for <stripes>, and only then?
    python bench/bench_multires.py --part fig3    # learn a striped star; the 3 × 5 grid and the baselines
    python bench/bench_multires.py --part compose # two learned concepts in one prompt: fixed + fully
    python bench/bench_multires.py --part speed   # training steps/s: ours vs a diffusers + transformers loop
    python bench/bench_multires.py --part speed --device cuda   # the same on a GPU (not yet run)

The concepts are objects with stripes of a second colour. The embedded base model never saw one, so no
inversion can find them there; fig3 and compose run on weights/tiny-stripes, the base model taught to draw
them under a pseudo-word <stripes> whose vector no token gives ("a red star with yellow <stripes>"). No words
reach stripes on it, and textual inversion has to find a vector that does from 4 renders at 64².

Every sample is read by engine.judge (striped=True) against the concept's scene: stripes (the object's two
colours, as body and stripes), shape, and both. fig3: for each mode (fixed <C|i|>, semi <C(i)>, fully <C[i]>)
and i ∈ {0, 3, 5, 7, 9}, --samples samples with the same seeds in every cell; baselines: one-vector textual
inversion (bins 1, the same steps), the planted <stripes> (the ceiling), words. Writes
bench/results/multires.json, multires_grid.png and the learned embeddings.
speed: the same batch of 4 at 64², alternating runs of --speed-steps steps, median of --repeats.
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import engine
from engine import images, judge, multires, templates, world
from engine.embedded import DEFAULT_MODEL, versions
from engine.profile import cpu_name
from engine.world import Obj, Scene
from bench_tiny import pixels
from stamps import save_part, stamp

RESULTS = Path(__file__).parent / "results"
STRIPES_MODEL = DEFAULT_MODEL.with_name("tiny-stripes")
TOKEN, INIT = "stripy", "star"
BACKGROUNDS = [("plain", "white", 0.1), ("plain", "gray", -0.15), ("plain", "black", 0.25), ("gradient", "red", 0.0)]
PROMPT = "a large {} in the center, on a plain gray background"
MODES = {"fixed": "<{}|{}|>", "semi": "<{}({})>", "fully": "<{}[{}]>"}
BINS = (0, 3, 5, 7, 9)
# blue and yellow, not red and yellow: those two average to orange, itself a world colour
STAR = Obj("star", "blue", "large", "in the center", stripes="yellow")
# the second concept of `compose`, and the scene both are read against
SQUARE, SQUARE_TOKEN, SQUARE_INIT = Obj("square", "green", "large", "in the center", stripes="purple"), "boxy", "square"
PAIR = Scene((Obj("star", "blue", "large", "on the left", stripes="yellow"),
              Obj("square", "green", "large", "on the right", stripes="purple")), "plain", "gray")
PAIR_PROMPT = "a large {} on the left and a large {} on the right, on a plain gray background"


def concept_images(obj: Obj = STAR, res: int = 64) -> torch.Tensor:
    ss = [Scene((dataclasses.replace(obj, dx=0.0, dy=0.0, angle=a),), b, c, 0.5) for b, c, a in BACKGROUNDS]
    return torch.from_numpy(world.render_batch(ss, res)).float()


def readings(x: torch.Tensor, scene: Scene) -> dict:
    """Per sample and object of `scene`: stripes right, shape right, both; and every object's stripes right."""
    out = {"stripes": [], "shape": [], "drawn": [], "all": []}
    for im in pixels(x):
        c = judge.check(judge.read(im, striped=True), scene)
        drawn = [a and b for a, b in zip(c["stripes"], c["shape"])]
        out["stripes"].append(c["stripes"])
        out["shape"].append(c["shape"])
        out["drawn"].append(drawn)
        out["all"].append(all(c["stripes"]))
    return out


def rates(r: dict) -> dict:
    flat = lambda k: [v for row in r[k] for v in (row if isinstance(row, list) else [row])]  # noqa: E731
    return {k: sum(flat(k)) / len(flat(k)) for k in r}


def load_stripes_model():
    pipe = engine.load(STRIPES_MODEL)
    pipe.model.load_embeddings(STRIPES_MODEL / "stripes.safetensors")
    return pipe


def sample(pipe, prompt, args):
    return pipe.generate([prompt] * args.samples, steps=50, guidance=args.guidance, seed=args.seed,
                         output="pt", progress=False)


def learn(pipe, obj, token, init, args, bins=10, name=None):
    cfg = multires.TrainConfig(token, init, bins=bins, steps=args.steps, batch=4, seed=0)
    name = name or f"multires_{token}"
    losses = []
    t0 = time.perf_counter()
    concept = multires.train(pipe.model, concept_images(obj), cfg, RESULTS / f"{name}.safetensors",
                             RESULTS / f"{name}.ckpt.safetensors", on_step=lambda s, loss: losses.append(loss))
    pipe.model.concepts[concept.name] = concept
    return {**vars(cfg), "seconds": round(time.perf_counter() - t0, 1),
            "loss_first_100": statistics.mean(losses[:100]), "loss_last_100": statistics.mean(losses[-100:])}


def model(args):
    """tiny and tiny-stripes on held-out scenes (seed 555), 30% of objects striped: with captions that name the
    stripes by <stripes> (tiny-stripes), and with the plain template captions (both)."""
    ss = world.striped(world.scenes(555, args.model_scenes), 555, 0.3)
    out, stripes = {}, load_stripes_model()
    for name, pipe, word in (("tiny, template captions", engine.load(), None),
                             ("tiny-stripes, template captions", stripes, None),
                             ("tiny-stripes, captions with <stripes>", stripes, "<stripes>")):
        caps = [s.caption(word) for s in ss]
        x = torch.cat([pipe.generate(caps[i:i + 50], steps=50, guidance=args.guidance, seed=i, output="pt",
                                     progress=False) for i in range(0, len(caps), 50)])
        hits = {"colour": [], "shape": [], "striped object": [], "plain object": []}
        for im, s in zip(pixels(x), ss):
            c = judge.check(judge.read(im, striped=True), s)
            hits["colour"] += c["colour"]
            hits["shape"] += c["shape"]
            for o, ok in zip(s.objects, c["stripes"]):
                hits["striped object" if o.stripes else "plain object"].append(ok)
        out[name] = {k: sum(v) / len(v) for k, v in hits.items()}
        out[name]["objects"] = {k: len(v) for k, v in hits.items()}
        print(name, json.dumps(out[name]), flush=True)
    _merge({"model": {"scenes": args.model_scenes, "seed": 555, "striped_share": 0.3, "steps": 50,
                      "guidance": args.guidance, "rates": out,
                      "metric": "engine.judge read(striped=True): per object, colour and shape as the caption names "
                                "them; stripes right = the two colours as body and stripes on a striped object, no "
                                "stripes on a plain one"}})


def fig3(args):
    pipe = load_stripes_model()
    train = {"multires": learn(pipe, STAR, TOKEN, INIT, args)}
    train["one vector"] = learn(pipe, STAR, TOKEN + "1", INIT, args, bins=1)
    scene = Scene((STAR,), "plain", "gray")
    table, cells = {}, {}
    for mode, fmt in MODES.items():
        table[mode] = {}
        for i in BINS:
            p = PROMPT.format(fmt.format(TOKEN, i))
            cells[(mode, i)] = x = sample(pipe, p, args)
            table[mode][str(i)] = {**rates(readings(x, scene)), "prompt": p}
            print(f"{mode:6s} i={i}: {json.dumps(table[mode][str(i)])}", flush=True)
    baselines = {}
    for name, p in (("native <C>", PROMPT.format(f"<{TOKEN}>")),
                    ("one vector (textual inversion)", PROMPT.format(f"<{TOKEN}1>")),
                    ("planted <stripes> (the ceiling)", PROMPT.format("blue star with yellow <stripes>")),
                    ("words: striped", PROMPT.format("striped blue star")),
                    ("words: with yellow stripes", PROMPT.format("blue star with yellow stripes")),
                    ("words: the concept's colour", PROMPT.format("blue star")),
                    ("init word", PROMPT.format(INIT))):
        cells[("baseline", name)] = x = sample(pipe, p, args)
        baselines[name] = {**rates(readings(x, scene)), "prompt": p}
        print(f"{name}: {json.dumps(baselines[name])}", flush=True)
    base = engine.load()  # the same inversion on tiny, which never saw a striped object
    train["multires on tiny"] = learn(base, STAR, TOKEN, INIT, args, name="multires_stripy_tiny")
    cells[("baseline", "native <C>, learned on tiny")] = x = sample(base, PROMPT.format(f"<{TOKEN}>"), args)
    baselines["native <C>, learned on tiny"] = {**rates(readings(x, scene)), "prompt": PROMPT.format(f"<{TOKEN}>")}
    truth = rates(readings(concept_images(), scene))

    got = {m: [table[m][str(i)]["stripes"] for i in BINS] for m in MODES}
    checks = {"fixed loses the stripes as i rises (i=0 > i=9)": got["fixed"][0] > got["fixed"][-1],
              "semi loses the stripes as i rises (i=0 > i=9)": got["semi"][0] > got["semi"][-1],
              "fully at or above semi at every i > 0": all(f >= s for f, s in zip(got["fully"][1:], got["semi"][1:])),
              "native <C> above every words baseline": baselines["native <C>"]["stripes"] > max(
                  v["stripes"] for k, v in baselines.items() if k.startswith("words"))}
    _merge({"fig3": {"model": STRIPES_MODEL.name, "concept": "a blue star with yellow stripes (4 renders, 64²)",
                     "token": TOKEN, "init_token": INIT, "train": train,
                     "sampling": {"steps": 50, "guidance": args.guidance, "samples_per_cell": args.samples,
                                  "seed": args.seed, "prompt": PROMPT, "semi": pipe.model.semi},
                     "metric": "engine.judge read(striped=True) against the concept's scene: stripes (blue and "
                               "yellow as body and stripes), shape (star), drawn (both); share of samples",
                     "concept_renders": truth, "table": table, "baselines": baselines, "checks": checks}})

    cell = lambda x: images.contact_sheet([(im, "") for im in images.to_pil(x[:4])], cell=64, columns=2)  # noqa: E731
    renders = concept_images()
    items = [(images.to_pil(renders)[k], f"concept {k}") for k in range(4)] + [(images.Image.new("RGB", (8, 8)), "")]
    pct = lambda v: f"{100 * v['stripes']:.0f}%"  # noqa: E731
    for mode in MODES:
        items += [(cell(cells[(mode, i)]), f"{mode} i={i}: {pct(table[mode][str(i)])}") for i in BINS]
    items += [(cell(cells[("baseline", n)]), f"{n}: {pct(baselines[n])}") for n in baselines]
    images.contact_sheet(items, cell=160, columns=5).save(RESULTS / "multires_grid.png")
    print(json.dumps(checks, indent=1))


def compose(args):
    """Two concepts learned apart (the star of fig3, a green square with purple stripes), then drawn side by
    side in one prompt: fixed <stripy|0|> with fully <boxy[5]>, each native, and the planted words."""
    pipe = load_stripes_model()
    train = {TOKEN: learn(pipe, STAR, TOKEN, INIT, args), SQUARE_TOKEN: learn(pipe, SQUARE, SQUARE_TOKEN,
                                                                             SQUARE_INIT, args)}
    alone = Scene((SQUARE,), "plain", "gray")
    rows = {"square alone, native <boxy>": (PROMPT.format(f"<{SQUARE_TOKEN}>"), alone)}
    for name, a, b in (("fixed <stripy|0|> + fully <boxy[5]>", f"<{TOKEN}|0|>", f"<{SQUARE_TOKEN}[5]>"),
                       ("native + native", f"<{TOKEN}>", f"<{SQUARE_TOKEN}>"),
                       ("planted <stripes> (the ceiling)", "blue star with yellow <stripes>",
                        "green square with purple <stripes>"),
                       ("words: the concepts' colours", "blue star", "green square")):
        rows[name] = (PAIR_PROMPT.format(a, b), PAIR)
    out = {}
    for name, (p, scene) in rows.items():
        r = readings(sample(pipe, p, args), scene)
        per = [sum(d[k] for d in r["stripes"]) / len(r["stripes"]) for k in range(len(scene.objects))]
        out[name] = {"prompt": p, "objects_striped": per, "all_striped": sum(r["all"]) / len(r["all"]),
                     **{k: v for k, v in rates(r).items() if k != "all"}}
        print(name, json.dumps(out[name]), flush=True)
    _merge({"compose": {"model": STRIPES_MODEL.name, "train": train, "rows": out,
                        "sampling": {"steps": 50, "guidance": args.guidance, "samples": args.samples,
                                     "seed": args.seed},
                        "metric": "engine.judge read(striped=True) against the two-object scene: per object, "
                                  "its stripes right (its two colours as body and stripes); all_striped: every "
                                  "object's in one sample"}})


def _merge(part: dict):
    path = RESULTS / "multires.json"
    for key, value in part.items():
        save_part(path, key, value, STAMP)
    print(f"wrote {path}")


def speed(args):
    """steps/s of multires.train vs the diffusers textual-inversion loop (examples/textual_inversion) on the same
    tiny model, batch and images: diffusers UNet + AutoencoderKL + transformers CLIPTextModel, the embedding
    table trained with its other rows restored after each step, the VAE encoding every batch."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(2)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    renders = concept_images().to(dev)
    ours = engine.load(device=args.device)
    tok = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    words = [f"<{TOKEN}|{i}|>" for i in range(10)]
    tok.add_tokens(words)
    ids_new = tok.convert_tokens_to_ids(words)
    te = CLIPTextModel.from_pretrained(DEFAULT_MODEL / "text_encoder")
    te.resize_token_embeddings(len(tok))
    init = tok.convert_tokens_to_ids(tok.tokenize(INIT))[0]
    with torch.no_grad():
        te.get_input_embeddings().weight[ids_new] = te.get_input_embeddings().weight[init].clone()
    unet = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet")
    vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL / "vae")
    sched = DDPMScheduler.from_pretrained(DEFAULT_MODEL / "scheduler")
    for m in (unet, vae, te):
        m.to(dev).requires_grad_(False)
    te.get_input_embeddings().requires_grad_(True)
    opt = torch.optim.AdamW(te.get_input_embeddings().parameters(), lr=2e-3, weight_decay=1e-2)
    orig = te.get_input_embeddings().weight.detach().clone()
    frozen = torch.ones(len(tok), dtype=torch.bool, device=dev)
    frozen[ids_new] = False
    temps = templates.templates_for("auto", ours.model.tokenizer)
    g = torch.Generator().manual_seed(0)

    def diffusers_steps(n, cached=None):
        for _ in range(n):
            idx = torch.randint(4, (4,), generator=g)
            x = renders[idx]
            t = torch.randint(1000, (4,), generator=g)
            if cached is None:
                z = vae.encode(x).latent_dist.sample(generator=g) * vae.config.scaling_factor
            else:
                mean, std = cached
                eps = torch.randn(mean[idx].shape, generator=g).to(dev)
                z = (mean[idx] + std[idx] * eps) * vae.config.scaling_factor
            noise = torch.randn(z.shape, generator=g).to(dev)
            prompts = [temps[k % len(temps)].format(words[int(b) // 100]) for k, b in enumerate(t)]
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            ids = ids.to(dev)
            t = t.to(dev)
            pred = unet(sched.add_noise(z, noise, t), t, te(ids)[0]).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                te.get_input_embeddings().weight[frozen] = orig[frozen]

    cfg = lambda n: multires.TrainConfig(TOKEN, INIT, steps=n, batch=4)  # noqa: E731
    with torch.no_grad():
        dist = vae.encode(renders).latent_dist
        cached = dist.mean, dist.std
    z = torch.randn(4, ours.model.unet.config.in_channels, 16, 16, device=dev)
    tt = torch.randint(1000, (4,), device=dev)
    emb = torch.randn(4, 77, ours.model.unet.config.cross_attention_dim, device=dev, requires_grad=True)

    def unet_alone(n):  # the floor of any loop on this model: our UNet's forward + backward to the text embeddings
        ours.model.unet.requires_grad_(False)
        for _ in range(n):
            ours.model.unet(z, tt, emb).square().mean().backward()

    runs = {"ours": lambda n: multires.train(ours.model, renders, cfg(n), progress=False),
            "diffusers": diffusers_steps,
            "diffusers + cached latents": lambda n: diffusers_steps(n, cached),
            "our UNet forward + backward alone": unet_alone}
    for fn in runs.values():
        fn(3)  # warm-up
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn(args.speed_steps)
            sync()
            times[name].append(args.speed_steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    result = {"device": dev.type, "device_name": name, "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "batch": 4, "resolution": 64,
              "steps_per_run": args.speed_steps, "repeats": args.repeats, "steps_per_s": times,
              "median_steps_per_s": med, "ratio_ours_over_diffusers": med["ours"] / med["diffusers"],
              "ratio_ours_over_diffusers_cached": med["ours"] / med["diffusers + cached latents"], "goal_ratio": 2.0,
              "note": "ours includes its setup (encoding the 4 images and their mirrors once) in every run"}
    print(json.dumps({k: result[k] for k in ("median_steps_per_s", "ratio_ours_over_diffusers",
                                             "ratio_ours_over_diffusers_cached")}, indent=1))
    _merge({"speed" if dev.type == "cpu" else f"speed_{dev.type}": result})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["model", "fig3", "compose", "speed", "all"], default="all")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the concept (default 3000)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--model-scenes", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--speed-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="speed: cpu (2 threads) or cuda; cuda results go to 'speed_cuda'")
    args = ap.parse_args()
    global STAMP
    index = json.loads((STRIPES_MODEL / "model_index.json").read_text())
    STAMP = stamp("bench_multires.py", {**versions(), STRIPES_MODEL.name: index["_engine_version"]})
    parts = {"model": model, "fig3": fig3, "compose": compose, "speed": speed}
    for name, fn in parts.items():
        if args.part in (name, "all"):
            fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
