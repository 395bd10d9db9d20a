"""The prompt templates textual inversion trains a pseudo-word under."""

# textual inversion's imagenet_templates_small / imagenet_style_templates_small
OBJECT = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
          "the photo of a {}", "a photo of a clean {}", "a photo of a dirty {}",
          "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
          "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
          "a photo of the {}", "a good photo of the {}", "a photo of one {}",
          "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
          "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
          "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
          "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}"]
STYLE = ["a painting in the style of {}", "a rendering in the style of {}",
         "a cropped painting in the style of {}", "the painting in the style of {}",
         "a clean painting in the style of {}", "a dirty painting in the style of {}",
         "a dark painting in the style of {}", "a picture in the style of {}",
         "a cool painting in the style of {}", "a close-up painting in the style of {}",
         "a bright painting in the style of {}", "a good painting in the style of {}",
         "a close-up painting in the style of {}", "a rendition in the style of {}",
         "a nice painting in the style of {}", "a small painting in the style of {}",
         "a weird painting in the style of {}", "a large painting in the style of {}",
         "a painting in the style of {}"]
# the embedded model's caption language (engine.world) has none of the words above
WORLD = ["a {}", "a large {}", "a {} in the center", "a large {} in the center"]
TEMPLATES = {"object": OBJECT, "style": STYLE, "world": WORLD}


def templates_for(name: str, tokenizer) -> list[str]:
    """A template set by name; "auto" = the object templates if the tokenizer knows their words,
    else world."""
    if name == "auto":
        words = {w for t in OBJECT for w in t.replace("{}", "").split()}
        return OBJECT if all(len(tokenizer.ids(w)) == 1 for w in words) else WORLD
    if name not in TEMPLATES:
        raise ValueError(f"templates={name!r}: use auto, {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
