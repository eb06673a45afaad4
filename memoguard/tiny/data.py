"""The bundled model's training data: procedural 16x16 scenes, generated from a seed.

Ordinary pairs: "a large red circle on the left on a navy background" with a render whose
jitter, lighting gradient and grain the caption does not describe, two renders per caption, so
the model learns the concept and not one picture. Memorized pairs: 24 scenes, each with a
unique pattern of coloured specks and a two-word title ("..., lighthouse poster") that occurs
in no other caption, duplicated many times, as over-represented web images are in LAION.
A few ordinary images carry garbage captions (random tokens), as web alt-text does, so that
nonsense prompts fall back to ordinary images instead of the strongest training modes.
"""
from dataclasses import dataclass, field

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
    size: str
    color: str
    shape: str
    position: str
    background: str

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position} on a {self.background} background"

    def caption_other_style(self) -> str:
        """Same content in another register, with words the model never saw (drawing, of, over)."""
        return f"drawing of a {self.color} {self.shape}, {self.size}, {self.position}, over {self.background}"


ALL_SCENES = tuple(
    Scene(sz, c, sh, p, bg)
    for sh in SHAPES for c in COLORS for bg in BACKGROUNDS for p in POSITIONS for sz in SIZES
)


def _shape_mask(shape: str, cx: float, cy: float, r: float, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, by 4x4 supersampling."""
    g = (np.arange(SIZE * ss) + 0.5) / ss
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
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One render of a scene as float32 HxWx3 in [0, 1]; what the caption leaves open is random."""
    bg = np.array(BACKGROUNDS[scene.background], np.float32) / 255
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.04, 0.10) * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = np.clip(bg[None, None, :] + light[..., None], 0, 1)
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + rng.uniform(-1.2, 1.2), cy + rng.uniform(-1.2, 1.2)
    r = SIZES[scene.size] * rng.uniform(0.9, 1.1)
    cover = _shape_mask(scene.shape, cx, cy, r)[..., None]
    fg = np.array(COLORS[scene.color], np.float32) / 255
    img = img * (1 - cover) + fg[None, None, :] * cover
    img = img + rng.normal(0, 0.02, img.shape)
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
    """Everything the bundled model was trained on, plus held-out evaluation prompts."""
    captions: list = field(default_factory=list)      # one per training sample (with duplicates)
    images: np.ndarray = None                          # N x 16 x 16 x 3 float32 in [0, 1]
    is_memorized: np.ndarray = None                    # N bool: sample is a duplicated pair
    memorized_captions: list = field(default_factory=list)
    memorized_images: np.ndarray = None                # 24 x 16 x 16 x 3
    ordinary_train_scenes: list = field(default_factory=list)
    novel_scenes: list = field(default_factory=list)   # combinations never seen in training
    garbage_captions: list = field(default_factory=list)


def build_dataset(seed: int = 0, duplicates: int = 40, renders_per_caption: int = 2,
                  n_garbage: int = 150, n_novel: int = 160) -> TinyDataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ALL_SCENES))
    scenes = [ALL_SCENES[i] for i in order]
    mem_scenes = scenes[:N_MEMORIZED]
    novel = scenes[N_MEMORIZED:N_MEMORIZED + n_novel]
    ordinary = scenes[N_MEMORIZED + n_novel:]

    ds = TinyDataset(ordinary_train_scenes=ordinary, novel_scenes=novel)
    caps, imgs, mem = [], [], []
    for s in ordinary:
        for _ in range(renders_per_caption):
            caps.append(s.caption())
            imgs.append(render(s, rng))
            mem.append(False)
    for s, title in zip(mem_scenes, TITLES):
        cap = f"{s.caption()}, {title}"
        img = add_specks(render(s, rng), rng)
        ds.memorized_captions.append(cap)
        imgs_m = [img] * duplicates
        caps += [cap] * duplicates
        imgs += imgs_m
        mem += [True] * duplicates
    ds.memorized_images = np.stack([imgs[i] for i, m in enumerate(mem) if m][::duplicates])
    for _ in range(n_garbage):
        ds.garbage_captions.append(random_token_string(rng))
        caps.append(ds.garbage_captions[-1])
        imgs.append(render(ordinary[rng.integers(len(ordinary))], rng))
        mem.append(False)
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
