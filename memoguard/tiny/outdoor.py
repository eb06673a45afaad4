"""The second evaluation model's training data: 32x32 outdoor scenes in ordinary English, from a seed.

Made to memorize the way SD does, where the bundled model does not (its memorized captions carry
titles and a comma that no ordinary caption has). Every caption is built from one vocabulary and
one set of templates, articles and commas included: "a red ball and a white tent on the beach",
"photo of a small blue box, in the snow". A memorized caption is one such combination (two
objects and a setting) that no ordinary caption repeats, so only the combination recalls its
image; every one of its words is common. Each memorized image is one fixed render duplicated
10, 20, 40 or 80 times (LAION's duplicates vary), so some are recalled weakly and some strongly.

Natural-image statistics: a sky and ground split at a random horizon, a 1/f ("pink") noise
texture, a lighting gradient, shaded objects with soft edges. The model sees these through its
own VAE (train.py trains one first), as SD sees photographs through its latent space.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .data import random_token_string, shape_mask

SIZE = 32
SHAPES = {"ball": "circle", "box": "square", "tent": "triangle", "kite": "diamond", "ring": "ring"}
COLORS = {
    "red": (215, 45, 40), "green": (45, 170, 70), "blue": (45, 85, 225), "yellow": (240, 215, 45),
    "purple": (145, 60, 195), "orange": (240, 135, 30), "white": (245, 245, 240), "black": (25, 25, 25),
}
# (sky, ground) colours and the words that place an object there
SETTINGS = {
    "field": ((120, 170, 230), (70, 140, 60), "in a field"),
    "beach": ((140, 195, 240), (220, 200, 150), "on the beach"),
    "snow": ((170, 175, 185), (235, 238, 242), "in the snow"),
    "desert": ((235, 175, 110), (200, 150, 90), "in the desert"),
    "night": ((20, 25, 60), (40, 40, 50), "at night"),
    "lake": ((150, 185, 215), (50, 90, 140), "by a lake"),
}
SIZES = {"small": 3.2, "large": 6.0}
COPY_RATIO = 0.5  # judge.nearest_training's ratio under which a generation copies (BENCHMARKS.md: the ratios seen)
DUPLICATES = (10, 20, 40, 80)   # memorized images, cycling: strength varies as in LAION
N_MEMORIZED = 32
# object kinds (colour, shape) never seen in training: the "novel" prompts
NOVEL_OBJECTS = (("red", "ring"), ("green", "tent"), ("blue", "kite"), ("yellow", "ball"),
                 ("purple", "box"), ("orange", "tent"), ("white", "kite"), ("black", "ball"))


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    size: Optional[str] = None

    def words(self) -> str:
        return f"{self.size + ' ' if self.size else ''}{self.color} {self.shape}"


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Scene:
    """What a caption states; what it leaves open (positions, texture, light) is drawn per render."""
    things: Tuple[Thing, ...]
    setting: Optional[str] = None
    template: int = 0

    @property
    def color(self) -> str:        # the first object's colour (alignment reads it, as the bundled judge does)
        return self.things[0].color

    def caption(self) -> str:
        objects = " and ".join(_article(t.words()) for t in self.things)
        where = SETTINGS[self.setting][2] if self.setting else ""
        if self.template == 1 and where:
            return f"{objects}, {where}"
        if self.template == 2:
            return f"photo of {objects}" + (f" {where}" if where else "")
        return f"{objects} {where}".strip()

    def caption_other_style(self) -> str:
        """The same content in words the model never saw (drawing, sketch, showing)."""
        objects = " next to ".join(t.words() for t in self.things)
        return f"sketch showing {objects}" + (f", {self.setting}" if self.setting else "")


def _pick(options, rng):
    options = list(options)
    return options[rng.integers(len(options))]


def _objects(novel: bool):
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    return [p for p in pairs if (p in NOVEL_OBJECTS) == novel]


def caption_scene(rng: np.random.Generator, novel: bool = False, two: Optional[bool] = None) -> Scene:
    """An ordinary caption: one object (sometimes two), a setting most of the time, one of three templates."""
    kinds = _objects(novel)
    n = (2 if two else 1) if two is not None else (2 if rng.random() < 0.35 else 1)
    things = []
    for _ in range(n):
        color, shape = _pick(kinds, rng)
        things.append(Thing(color, shape, _pick(SIZES, rng) if rng.random() < 0.25 else None))
    setting = _pick(SETTINGS, rng) if rng.random() < 0.8 else None
    return Scene(tuple(things), setting, int(rng.integers(3)))


def pink_noise(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """SIZE x SIZE x 3 noise with a 1/f amplitude spectrum (natural images' statistics)."""
    f = np.sqrt(np.fft.fftfreq(SIZE)[:, None] ** 2 + np.fft.fftfreq(SIZE)[None, :] ** 2)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, SIZE, SIZE)) + 1j * rng.normal(size=(3, SIZE, SIZE))) / f
    spectrum[:, 0, 0] = 0
    noise = np.real(np.fft.ifft2(spectrum)).transpose(1, 2, 0)
    return (amplitude * noise / noise.std()).astype(np.float32)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One render, float32 HxWx3 in [0, 1]: positions, horizon, texture and light drawn from rng."""
    setting = scene.setting or _pick(SETTINGS, rng)
    sky, ground = (np.array(c, np.float32) / 255 for c in SETTINGS[setting][:2])
    horizon = rng.uniform(11, 19)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    ground_share = np.clip(yy - horizon + 0.5, 0, 1)[..., None]
    img = sky * (1 - ground_share) + ground * ground_share
    angle = rng.uniform(0, 2 * np.pi)
    img = img + (rng.uniform(0.03, 0.08) * (np.cos(angle) * xx + np.sin(angle) * yy) / SIZE - 0.03)[..., None]
    img = img + pink_noise(rng, 0.045)
    slots = [rng.uniform(6, 26)] if len(scene.things) == 1 else [rng.uniform(5, 13), rng.uniform(19, 27)]
    for thing, cx in zip(scene.things, slots):
        r = SIZES[thing.size or _pick(SIZES, rng)] * rng.uniform(0.9, 1.1)
        cy = np.clip(horizon + rng.uniform(-2, 4), r, SIZE - r)
        cover = shape_mask(SHAPES[thing.shape], cx, cy, r, ss=3, size=SIZE)[..., None]
        shade = 1 + 0.18 * ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle))[..., None] / max(r, 1)
        fg = np.array(COLORS[thing.color], np.float32) / 255 * shade
        img = img * (1 - cover) + fg * cover
    img = img + rng.normal(0, 0.008, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


@dataclass
class OutdoorDataset:
    """Everything the second evaluation model trains on, plus held-out evaluation scenes."""
    captions: list = field(default_factory=list)
    images: np.ndarray = None
    is_memorized: np.ndarray = None
    memorized_captions: list = field(default_factory=list)
    memorized_scenes: list = field(default_factory=list)
    memorized_images: np.ndarray = None
    memorized_duplicates: list = field(default_factory=list)
    ordinary_train_scenes: list = field(default_factory=list)
    novel_scenes: list = field(default_factory=list)
    garbage_captions: list = field(default_factory=list)


def build_dataset(seed: int = 0, n_ordinary: int = 4000, n_garbage: int = 150, n_novel: int = 200) -> OutdoorDataset:
    rng = np.random.default_rng(seed)
    ds = OutdoorDataset()
    memorized = []
    while len(memorized) < N_MEMORIZED:
        scene = caption_scene(rng, two=True)
        scene = Scene(tuple(Thing(t.color, t.shape) for t in scene.things), scene.setting or "field", scene.template)
        if scene.caption() not in {s.caption() for s in memorized}:
            memorized.append(scene)
    reserved = {s.caption() for s in memorized}
    caps, imgs, mem = [], [], []
    while len(ds.ordinary_train_scenes) < n_ordinary:
        scene = caption_scene(rng)
        if scene.caption() in reserved:
            continue
        ds.ordinary_train_scenes.append(scene)
        caps.append(scene.caption())
        imgs.append(render(scene, rng))
        mem.append(False)
    for i, scene in enumerate(memorized):
        copies = DUPLICATES[i % len(DUPLICATES)]
        img = render(scene, rng)
        ds.memorized_captions.append(scene.caption())
        ds.memorized_scenes.append(scene)
        ds.memorized_duplicates.append(copies)
        caps += [scene.caption()] * copies
        imgs += [img] * copies
        mem += [True] * copies
    ds.memorized_images = np.stack([imgs[caps.index(c)] for c in ds.memorized_captions])
    for _ in range(n_garbage):
        ds.garbage_captions.append(random_token_string(rng))
        caps.append(ds.garbage_captions[-1])
        imgs.append(render(caption_scene(rng), rng))
        mem.append(False)
    ds.novel_scenes = [caption_scene(rng, novel=True) for _ in range(n_novel)]
    ds.captions, ds.images, ds.is_memorized = caps, np.stack(imgs), np.array(mem)
    return ds


def autoencoder_images(n: int, seed: int = 7) -> np.ndarray:
    """Fresh renders of ordinary scenes (not the training set) for the VAE, as SD's VAE saw other photos."""
    rng = np.random.default_rng(seed)
    return np.stack([render(caption_scene(rng, novel=rng.random() < 0.1), rng) for _ in range(n)])


_SKY_GROUND = {k: (np.array(v[0], np.float32) / 255, np.array(v[1], np.float32) / 255) for k, v in SETTINGS.items()}
_FG = {k: np.array(v, np.float32) / 255 for k, v in COLORS.items()}


def read_setting(image: np.ndarray) -> str:
    """The setting whose sky and ground colours are nearest the top and bottom rows' medians."""
    sky, ground = np.median(image[:4].reshape(-1, 3), 0), np.median(image[-4:].reshape(-1, 3), 0)
    return min(_SKY_GROUND, key=lambda k: float(((_SKY_GROUND[k][0] - sky) ** 2).sum()
                                                + ((_SKY_GROUND[k][1] - ground) ** 2).sum()))


def shows_color(image: np.ndarray, color: str, min_pixels: int = 6, tolerance: float = 0.22) -> bool:
    """Whether at least min_pixels pixels are nearer `color` than any other object colour, within tolerance."""
    dist = {k: np.sqrt(((image - c) ** 2).sum(-1)) for k, c in _FG.items()}
    nearest = np.argmin(np.stack(list(dist.values())), 0) == list(_FG).index(color)
    return int((nearest & (dist[color] < tolerance)).sum()) >= min_pixels


def alignment(images, scenes) -> np.ndarray:
    """Share of the caption's stated attributes each image shows: every object's colour, and the setting."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images, np.float32)
    if len(arr) != len(scenes):
        raise ValueError(f"{len(arr)} images but {len(scenes)} scenes")
    out = []
    for img, scene in zip(arr, scenes):
        checks = [shows_color(img, t.color) for t in scene.things]
        if scene.setting:
            checks.append(read_setting(img) == scene.setting)
        out.append(float(np.mean(checks)))
    return np.array(out)
