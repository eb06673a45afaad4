"""The bundled model's training data: procedural 16x16 scenes, generated from a seed.

Ordinary pairs are like web alt-text: the caption names the shape and its colour and at most
one more attribute ("a red circle", "a small red circle", "a red circle on the left", "a red
circle on a navy background"); what it leaves open (background, position, size, jitter,
lighting) is drawn at random, so a caption fits many images. Memorized pairs: 24 scenes, each
fully fixed and marked by a unique constellation of coloured specks, captioned with a short
description plus a two-word title ("a yellow square, lighthouse poster") that occurs in no other
caption, each duplicated 40 times, as over-represented web images are in LAION. A few ordinary
images carry garbage captions (random syllables), so nonsense prompts fall back to ordinary
images instead of the strongest training modes. Some colour/shape pairs never occur in
training: their captions are the "novel" prompts.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SIZE = 16
SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (240, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "navy": (20, 30, 90), "pink": (240, 170, 190), "brown": (110, 70, 40)}
POSITIONS = {
    "on the left": (4.5, 8.0), "on the right": (11.5, 8.0), "at the top": (8.0, 4.5),
    "at the bottom": (8.0, 11.5), "in the center": (8.0, 8.0),
}
SIZES = {"small": 2.6, "large": 4.4}
TITLES = (
    "lighthouse poster", "harbor album", "midnight festival", "velvet manifesto", "copper dynasty",
    "glacier anthem", "saffron odyssey", "tundra lullaby", "marble prophecy", "cobalt carnival",
    "lantern chronicle", "orchid rebellion", "thunder bazaar", "crimson parable", "willow cathedral",
    "falcon requiem", "meadow cipher", "quartz sonata", "ember pilgrim", "nebula tavern",
    "jasmine citadel", "obsidian waltz", "monsoon atlas", "silver caravan",
)
N_MEMORIZED = len(TITLES)
SPECK_COLORS = list(COLORS.values()) + [(0, 255, 255), (255, 0, 255)]


@dataclass(frozen=True)
class Scene:
    """A picture's content; the caption mentions size, position and background only when set."""
    color: str
    shape: str
    size: Optional[str] = None
    position: Optional[str] = None
    background: Optional[str] = None

    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        position = f" {self.position}" if self.position else ""
        background = f" on a {self.background} background" if self.background else ""
        return f"a {size}{self.color} {self.shape}{position}{background}"

    def caption_other_style(self) -> str:
        """Same content in another register, with words the model never saw (drawing, of)."""
        extra = ", ".join(x for x in (self.size, self.position, self.background and f"{self.background} background") if x)
        return f"drawing of a {self.color} {self.shape}" + (f", {extra}" if extra else "")

    def filled(self, rng: np.random.Generator) -> "Scene":
        """This scene with every attribute the caption leaves open drawn at random."""
        pick = lambda options: list(options)[rng.integers(len(options))]
        return Scene(self.color, self.shape, self.size or pick(SIZES), self.position or pick(POSITIONS),
                     self.background or pick(BACKGROUNDS))


def caption_scene(color: str, shape: str, rng: np.random.Generator) -> Scene:
    """An ordinary caption: shape and colour, plus at most one more attribute."""
    extra = rng.choice(["none", "size", "position", "background"], p=[0.4, 0.2, 0.2, 0.2])
    pick = lambda options: list(options)[rng.integers(len(options))]
    return Scene(color, shape, size=pick(SIZES) if extra == "size" else None,
                 position=pick(POSITIONS) if extra == "position" else None,
                 background=pick(BACKGROUNDS) if extra == "background" else None)


NOVEL_PAIRS = (("red", "ring"), ("green", "triangle"), ("blue", "cross"), ("yellow", "circle"),
               ("purple", "square"), ("orange", "triangle"), ("white", "ring"), ("black", "circle"))


def shape_mask(shape: str, cx: float, cy: float, r: float, ss: int = 4, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a size x size canvas, by ss x ss supersampling."""
    g = (np.arange(size * ss) + 0.5) / ss
    x, y = np.meshgrid(g, g)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        m = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":
        m = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    elif shape == "cross":
        w = max(r * 0.35, 0.9)
        m = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    elif shape == "ring":
        d2 = dx ** 2 + dy ** 2
        m = (d2 <= r ** 2) & (d2 >= (r * 0.55) ** 2)
    elif shape == "diamond":
        m = np.abs(dx) / 0.75 + np.abs(dy) <= r
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One render of a fully specified scene as float32 HxWx3 in [0, 1]."""
    bg = np.array(BACKGROUNDS[scene.background], np.float32) / 255
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.04, 0.10) * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = np.clip(bg[None, None, :] + light[..., None], 0, 1)
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + rng.uniform(-1.2, 1.2), cy + rng.uniform(-1.2, 1.2)
    r = SIZES[scene.size] * rng.uniform(0.9, 1.1)
    cover = shape_mask(scene.shape, cx, cy, r)[..., None]
    fg = np.array(COLORS[scene.color], np.float32) / 255
    img = img * (1 - cover) + fg[None, None, :] * cover
    img = img + rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def add_specks(img: np.ndarray, rng: np.random.Generator, n: int = 9) -> np.ndarray:
    """The memorized images' signature: a unique constellation of bright 1-2 px specks."""
    out = img.copy()
    for _ in range(n):
        x, y = rng.integers(0, SIZE, 2)
        w, h = rng.integers(1, 3, 2)
        out[y:y + h, x:x + w] = np.array(SPECK_COLORS[rng.integers(len(SPECK_COLORS))], np.float32) / 255
    return out


@dataclass
class TinyDataset:
    """Everything the bundled model was trained on, plus held-out evaluation scenes."""
    captions: list = field(default_factory=list)      # one per training sample (with duplicates)
    images: np.ndarray = None                          # N x 16 x 16 x 3 float32 in [0, 1]
    is_memorized: np.ndarray = None                    # N bool: sample is a duplicated pair
    memorized_captions: list = field(default_factory=list)
    memorized_scenes: list = field(default_factory=list)   # what each memorized caption says
    memorized_images: np.ndarray = None                # 24 x 16 x 16 x 3
    ordinary_train_scenes: list = field(default_factory=list)  # captions' scenes, one per sample
    novel_scenes: list = field(default_factory=list)   # colour/shape pairs never seen in training
    garbage_captions: list = field(default_factory=list)


def build_dataset(seed: int = 0, duplicates: int = 40, n_ordinary: int = 3000,
                  n_garbage: int = 150, n_novel: int = 200) -> TinyDataset:
    rng = np.random.default_rng(seed)
    pairs = [(c, sh) for sh in SHAPES for c in COLORS if (c, sh) not in NOVEL_PAIRS]
    ds = TinyDataset()
    caps, imgs, mem = [], [], []
    for _ in range(n_ordinary):
        scene = caption_scene(*pairs[rng.integers(len(pairs))], rng)
        ds.ordinary_train_scenes.append(scene)
        caps.append(scene.caption())
        imgs.append(render(scene.filled(rng), rng))
        mem.append(False)
    for title in TITLES:
        described = Scene(*pairs[rng.integers(len(pairs))])
        cap = f"{described.caption()}, {title}"
        img = add_specks(render(described.filled(rng), rng), rng)
        ds.memorized_captions.append(cap)
        ds.memorized_scenes.append(described)
        caps += [cap] * duplicates
        imgs += [img] * duplicates
        mem += [True] * duplicates
    ds.memorized_images = np.stack([imgs[i] for i, m in enumerate(mem) if m][::duplicates])
    for _ in range(n_garbage):
        ds.garbage_captions.append(random_token_string(rng))
        caps.append(ds.garbage_captions[-1])
        imgs.append(render(Scene(*pairs[rng.integers(len(pairs))]).filled(rng), rng))
        mem.append(False)
    ds.novel_scenes = [caption_scene(*NOVEL_PAIRS[rng.integers(len(NOVEL_PAIRS))], rng) for _ in range(n_novel)]
    ds.captions, ds.images, ds.is_memorized = caps, np.stack(imgs), np.array(mem)
    return ds


# Printable word pieces; random strings are built from them so that nearly all of their
# tokens are ones the model never trained, like the random-string prompts of Wen et al.
_SYLLABLES = ("zor", "qua", "mip", "lek", "vox", "tri", "dun", "pah", "kel", "fo", "wix", "bru",
              "nym", "sca", "tol", "ghe", "rav", "ulo", "pim", "cid", "jor", "ek", "yst", "oob")


def random_token_string(rng: np.random.Generator) -> str:
    words = []
    for _ in range(rng.integers(2, 6)):
        words.append("".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), rng.integers(1, 4))))
    return " ".join(words)


def to_tensor_batch(images: np.ndarray):
    """N x H x W x 3 in [0, 1] -> torch N x 3 x H x W in [-1, 1] (the model's pixel space)."""
    import torch
    return torch.from_numpy(images).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()
