"""Calibrating the checkpoint the WebUI has loaded, through the WebUI's own model (button and API route).

The core's `memoguard.measure.calibrate` needs a `DiffusionModel` that encodes prompts and samples
a schedule. Here that model is the WebUI's: prompts go through `sd_model.get_learned_conditioning`
(A1111's hijacked CLIP with its chunking and emphasis; Forge's text-processing engine), the UNet is
called as the sampler calls it (A1111: the k-diffusion CompVisDenoiser / CompVisVDenoiser the Euler
sampler wraps shared.sd_model in, so denoised x0 at sigma; Forge: the KModel's apply_model, Forge Neo's flow
models included), and the schedule is the one Euler's "Automatic" scheduler gives (DDIM in sigma form = Euler).
The result is saved as <models_path>/memoguard/<key>.json, keyed by the weights fingerprint, and
the script's verdicts pick it up by key.
"""
import math
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from memoguard import DiffusionModel, PromptEncoding
from memoguard.hosts import coefficients_kdiffusion, prediction_name
from memoguard.calibration import CALIBRATION_SEEDS, CalibrationError, CalibrationStore, default_benign_prompts
from memoguard.calibration_lookup import NO_FILE, CalibrationLookup, file_choices
from memoguard.measure import calibrate

from .forge import host_name, is_forge
from .model_identity import checkpoint_name, denoiser_module, model_key

STORE_SUBFOLDER = "memoguard"
LIMITS = dict(prompts=(10, 10000), band_prompts=(0, 10000), steps=(2, 150), width=(64, 4096), height=(64, 4096),
              guidance=(1.0, 30.0), fpr=(0.0, 0.5), batch_size=(1, 64))
# What one request may ask of the GPU, whoever sends it: its body, each prompt, and the whole work in UNet
# evaluations of a 512x512 image (one per prompt and seed for the verdict, two per step of each band run).
# The defaults need about 2,500; the limit is under an hour on a mid-range GPU.
MAX_BODY_BYTES = 1 << 20
MAX_PROMPT_CHARS = 2000
MAX_WORK = 40000
# the whole shipped benign list and 32 band runs by default, as the CLI and ComfyUI calibrate
DEFAULTS = dict(prompts=len(default_benign_prompts()), band_prompts=32, steps=20, width=512, height=512, guidance=7.0,
                fpr=0.01, batch_size=8)
HOW_TO = ("to calibrate it, open 'Calibrate this checkpoint' under the MemoGuard script, "
          "or POST /memoguard/v1/calibrate")


class CalibrationBusy(CalibrationError):
    """Another calibration holds the WebUI (the API answers 409)."""


class CalibrationCancelled(CalibrationError):
    """The client left, or the user pressed Interrupt: stopped, nothing saved."""


lock = threading.Lock()  # one calibration at a time (and, inside the WebUI, never during a generation)
running: dict = {}  # who holds `lock`: {"by", "since", "progress"}, for the 409 answer


def store_folder() -> Path:
    from modules import paths
    return Path(paths.models_path) / STORE_SUBFOLDER


def store() -> CalibrationStore:
    return CalibrationStore(store_folder())


def file_options() -> list:
    """The Calibration file choices: no file, then the calibrations in models/memoguard."""
    return [NO_FILE] + file_choices([store_folder()])


def lookup(calibration_file: str) -> CalibrationLookup:
    """The core's lookup in models/memoguard: the file picked there, else the checkpoint's own by key."""
    picked = calibration_file not in ("", NO_FILE)
    return CalibrationLookup("file" if picked else "auto", calibration_file, [store_folder()], HOW_TO)


def prediction_of(sd_model) -> str:
    """What the checkpoint predicts, as calibrations record it: eps | v (| flow | edm on Forge)."""
    if getattr(sd_model, "forge_objects", None) is not None:
        kind = getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "epsilon")
        return prediction_name(kind)
    return "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"


def _autocast():
    try:
        from modules import devices
        return devices.autocast()
    except (ImportError, AttributeError):
        return nullcontext()


def _conditioning_prompts(prompts, width: int, height: int):
    """A1111/Forge take an SdConditioning (a list that carries the image size, which SDXL encodes)."""
    try:
        from modules.prompt_parser import SdConditioning
    except ImportError:
        return list(prompts)
    return SdConditioning(list(prompts), width=width, height=height)


class _Encoder:
    """sd_model.get_learned_conditioning as PromptEncodings (SD1/SD2 tensor, SDXL's or Flux's {'crossattn', 'vector',
    ...}, or one tensor a prompt)."""

    def __init__(self, sd_model, width, height, extra_key):
        self.sd_model, self.width, self.height, self.extra_key = sd_model, width, height, extra_key

    def __call__(self, prompts):
        with _autocast():
            cond = self.sd_model.get_learned_conditioning(_conditioning_prompts(prompts, self.width, self.height))
        extra = {}
        if isinstance(cond, dict):
            extra[self.extra_key] = cond["vector"].float()
            if "guidance" in cond:  # Forge Neo's Flux dev: its distilled guidance, a model input as the sampler's
                extra["guidance"] = cond["guidance"].float()
            cond = cond["crossattn"]
        if isinstance(cond, (list, tuple)):  # one tensor per prompt: (L, C), or (1, L, C) (Forge Neo's Anima)
            cond = [c[0] if c.dim() == 3 and c.shape[0] == 1 else c for c in cond]
            length = max(c.shape[0] for c in cond)
            cond = torch.stack([c.repeat(length // c.shape[0], 1) if c.shape[0] != length else c for c in cond])
        emb = cond.float()
        b, n = emb.shape[:2]
        none = torch.zeros(b, n, dtype=torch.bool)
        return PromptEncoding(emb, [[""] * n for _ in range(b)], none, none.clone(), extra)


class _SigmaModel(DiffusionModel):
    """What both WebUIs share: prompts through _Encoder, the schedule the Euler sampler's "Automatic" scheduler
    gives (`sigmas(n)`: n sigmas and a final 0), denoised x0 at sigma (x = x0 + sigma * eps; a rectified flow read
    in the same form, memoguard.score)."""

    parameterization = "x0"

    def __init__(self, sigmas):
        self.sigmas = sigmas
        self.sigma_max = float(sigmas(2)[0])
        self.init_noise_sigma = self.sigma_max  # the sampler's x_T (a flow model's sigma_max is 1: the noise itself)

    def encode(self, prompts):
        return self._encode(prompts)

    def timesteps(self, steps: int) -> torch.Tensor:
        return self.sigmas(steps)[:-1].float()

    def coefficients(self, t):
        return coefficients_kdiffusion(t)


class WebUIKDiffusionModel(_SigmaModel):
    """A1111: shared.sd_model behind the k-diffusion wrapper its Euler sampler builds (denoised x0 at sigma)."""

    def __init__(self, sd_model, width: int, height: int):
        from modules import sd_samplers_kdiffusion
        model = getattr(sd_model, "model", None)
        if getattr(model, "conditioning_key", "crossattn") not in ("crossattn", None) and \
                not hasattr(sd_model, "conditioner"):
            raise CalibrationError(f"calibration supports text-to-image SD1.x, SD2.x and SDXL checkpoints; this one has "
                                   f"conditioning '{model.conditioning_key}' (inpainting / unCLIP)")
        self.sd_model = sd_model
        self.wrap = sd_samplers_kdiffusion.CFGDenoiserKDiffusion(None).inner_model  # as the sampler builds it
        self.prediction = prediction_of(sd_model)
        self._encode = _Encoder(sd_model, width, height, "vector")
        self.sdxl = hasattr(sd_model, "conditioner")
        super().__init__(self.wrap.get_sigmas)

    def raw_prediction(self, x, t, embedding, extra):
        image_cond = x.new_zeros(x.shape[0], 5, 1, 1)  # what txt2img passes a text-to-image model
        if self.sdxl:
            cond = {"crossattn": embedding, "vector": extra["vector"], "c_concat": [image_cond]}
        else:
            cond = {"c_crossattn": [embedding], "c_concat": [image_cond]}
        with _autocast():
            return self.wrap(x, t.to(x.device), cond=cond).float()


class ForgeKModel(_SigmaModel):
    """Forge: the loaded UnetPatcher's KModel (apply_model -> denoised x0 at sigma) and its predictor's sigmas."""

    def __init__(self, sd_model, width: int, height: int):
        from modules import sd_samplers_kdiffusion
        self.unet = sd_model.forge_objects.unet
        self.kmodel = self.unet.model
        self.prediction = prediction_of(sd_model)
        self._encode = _Encoder(sd_model, width, height, "y")
        super().__init__(_forge_sigmas(sd_model, sd_samplers_kdiffusion.CFGDenoiserKDiffusion(None).inner_model))
        self._prepared = False

    def raw_prediction(self, x, t, embedding, extra):
        if not self._prepared:  # Forge moves the UNet to its device (and applies LoRA patches) for sampling
            try:
                from backend.sampling.sampling_function import sampling_prepare
                sampling_prepare(self.unet, x)
            except ImportError:
                pass
            self._prepared = True
        return self.kmodel.apply_model(x, t.to(x.device), c_crossattn=embedding, transformer_options={},
                                       **extra).float()


def _forge_sigmas(sd_model, linker):
    """Forge's "Automatic" schedule for Euler: its schedule linker's own sigmas, except on Forge Neo for the
    families that are not SD1 / SDXL (Flux, Anima, Qwen-Image ...), where Automatic is Neo's Normal scheduler over
    the predictor's sigma range (the linker's own would start a flow model above sigma 1)."""
    if host_name() != "forge-neo" or sd_model.is_webui_legacy_model():
        return linker.get_sigmas
    from modules import sd_schedulers
    normal = sd_schedulers.schedulers_map["Normal"].function
    return lambda n: normal(n, float(linker.sigmas[0]), float(linker.sigmas[-1]), inner_model=linker, device="cpu")


def sampling_model(sd_model, width: int, height: int) -> DiffusionModel:
    return (ForgeKModel if is_forge() else WebUIKDiffusionModel)(sd_model, width, height)


def check_request(values: dict) -> dict:
    """Defaults filled in, types and ranges checked; a CalibrationError names what is wrong."""
    out = dict(DEFAULTS)
    unknown = set(values) - set(DEFAULTS) - {"prompt_list"}
    if unknown:
        raise CalibrationError(f"unknown calibration setting(s): {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(sorted(DEFAULTS))}, prompt_list")
    for name, value in values.items():
        if value is None or name == "prompt_list":
            continue
        kind = float if isinstance(DEFAULTS[name], float) else int
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise CalibrationError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise CalibrationError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise CalibrationError(f"{name} must be a {'whole ' if kind is int else ''}number, got {value!r}")
        out[name] = kind(number)
    for name, (low, high) in LIMITS.items():
        v = out[name]
        if not (low < v <= high if name == "fpr" else low <= v <= high):
            raise CalibrationError(f"{name} must be in {'(' if name == 'fpr' else '['}{low:g}, {high:g}], got {v:g}")
    for name in ("width", "height"):
        if out[name] % 8:
            raise CalibrationError(f"{name} must be a multiple of 8 (the latent is 1/8 of the image), got {out[name]}")
    prompts = values.get("prompt_list")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = prompts.splitlines()
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(s, str) for s in prompts):
            raise CalibrationError("prompt_list must be a list of strings (or one prompt per line)")
        prompts = [s.strip() for s in prompts if s.strip()]
        low, high = LIMITS["prompts"]
        if not low <= len(prompts) <= high:
            raise CalibrationError(f"prompt_list must hold {low} to {high} prompts, got {len(prompts)}")
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if len(prompts[longest]) > MAX_PROMPT_CHARS:
            raise CalibrationError(f"prompt_list[{longest}] has {len(prompts[longest])} characters; at most "
                                   f"{MAX_PROMPT_CHARS} a prompt")
        out["prompts"] = len(prompts)
    else:
        shipped = default_benign_prompts()
        if out["prompts"] > len(shipped):
            raise CalibrationError(f"prompts must be at most {len(shipped)} (the shipped benign prompts), "
                                   f"got {out['prompts']}; pass prompt_list for more")
        prompts = shipped[:out["prompts"]]
    out["prompt_list"] = prompts
    out["band_prompts"] = min(out["band_prompts"], out["prompts"])
    work = work_of(out)
    if work > MAX_WORK:
        raise CalibrationError(f"this calibration asks for {work:,.0f} UNet evaluations at 512x512 ({out['prompts']} "
                               f"prompts x {CALIBRATION_SEEDS} seeds + {out['band_prompts']} band runs x "
                               f"{out['steps']} steps x 2 at "
                               f"{out['width']}x{out['height']}); at most {MAX_WORK:,}: fewer band runs, steps or "
                               f"pixels")
    return out


def work_of(settings: dict) -> float:
    """UNet evaluations of a 512x512 image the calibration costs: one a prompt and seed (the empty prompt's at each
    seed is shared), two a step of a band run."""
    evaluations = settings["prompts"] * CALIBRATION_SEEDS + 2 * settings["band_prompts"] * settings["steps"]
    return evaluations * settings["width"] * settings["height"] / (512 * 512)


@contextmanager
def _webui_job(progress_text: Callable[[str], None]):
    """Hold the WebUI's generation queue (never calibrate while it samples), show progress, never leave it set."""
    try:
        from modules import call_queue
        queue = call_queue.queue_lock
    except (ImportError, AttributeError):
        queue = nullcontext()
    from modules import shared
    state = shared.state
    with queue:
        if hasattr(state, "begin"):
            state.begin(job="memoguard_calibrate")
        try:
            yield
        finally:
            progress_text(None)
            if hasattr(state, "end"):
                state.end()


def calibrate_current(settings: Optional[dict] = None, progress: Optional[Callable[[str], None]] = None, *,
                      requested_by: str = "the WebUI panel", cancelled: Optional[threading.Event] = None) -> dict:
    """Calibrate shared.sd_model; returns what the API answers. Raises CalibrationError with a clear message
    (CalibrationBusy while another calibration runs; CalibrationCancelled once `cancelled` is set or the user
    interrupts: nothing is saved)."""
    from modules import shared
    s = check_request(dict(settings or {}))
    if is_forge():  # Forge loads the selected checkpoint lazily, at the first generation
        from modules import sd_models
        if hasattr(sd_models, "forge_model_reload"):
            sd_models.forge_model_reload()
    sd_model = shared.sd_model
    if sd_model is None or not (hasattr(sd_model, "forge_objects") or hasattr(sd_model, "model")):
        raise CalibrationError("no checkpoint is loaded")
    if not lock.acquire(blocking=False):
        holder = dict(running)
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", time.time())))
        raise CalibrationBusy(f"a calibration is already running (started {since} by {holder.get('by', 'unknown')}"
                              f"{'; ' + holder['progress'] if holder.get('progress') else ''}); try again when it "
                              f"has finished")
    started = time.time()
    running.update(by=requested_by, since=started, progress="waiting for the generation queue")

    def show(text):
        if text and ((cancelled is not None and cancelled.is_set()) or getattr(shared.state, "interrupted", False)):
            raise CalibrationCancelled("calibration cancelled (the client left or Interrupt was pressed); "
                                       "nothing was saved")
        shared.state.textinfo = text
        running["progress"] = text
        if progress is not None and text:
            progress(text)

    try:
        with _webui_job(show), torch.inference_mode() if is_forge() else torch.no_grad():
            model = sampling_model(sd_model, s["width"], s["height"])
            shape = _latent_shape(sd_model, s["width"], s["height"])
            show("MemoGuard calibration: preparing")
            _first_forward(model, shape)  # weights final (lazy LoRA merge, Forge's load) before the key is taken
            key = model_key(sd_model)
            conditions = {"host": host_name(), "prediction": model.prediction,
                          "sampler": "Euler", "scheduler": "Automatic", "steps": s["steps"],
                          "width": s["width"], "height": s["height"], "checkpoint": checkpoint_name(sd_model)}
            done = {}

            def report(stage, n, total):
                done[stage] = (n, total)
                show(f"MemoGuard calibration: {stage} {n}/{total} prompts")

            calibration = calibrate(model, s["prompt_list"], model_key=key, shape=shape, steps=s["steps"],
                                    seeds=range(CALIBRATION_SEEDS), guidance=s["guidance"],
                                    band_prompts=s["band_prompts"],
                                    batch_size=s["batch_size"], conditions=conditions, progress=report)
            calibration.meta.update(checkpoint=checkpoint_name(sd_model), seconds=round(time.time() - started, 1))
            path = store().save(calibration)
    finally:
        running.clear()
        lock.release()
    threshold = calibration.threshold(s["fpr"])
    return {"model_key": key, "checkpoint": checkpoint_name(sd_model), "threshold": threshold, "fpr": s["fpr"],
            "median": calibration.median, "prompts": calibration.meta["prompts"],
            "band": calibration.band is not None, "band_prompts": s["band_prompts"] if calibration.band else 0,
            "conditions": calibration.conditions, "saved_to": str(path),
            "seconds": round(time.time() - started, 1)}


def _latent_shape(sd_model, width: int, height: int) -> tuple:
    """One image's txt2img latent as the WebUI makes it: Forge's VAE's channels (16 for Flux, Anima, Qwen-Image)
    with a frame axis where Forge Neo samples video latents (is_wan: Anima, Qwen-Image), else the denoiser's input
    channels; 1/8 of the image size."""
    vae = getattr(getattr(sd_model, "forge_objects", None), "vae", None)
    channels = getattr(vae, "latent_channels", None) or _latent_channels(sd_model)
    frames = (1,) if getattr(sd_model, "is_wan", False) else ()
    return (channels, *frames, height // 8, width // 8)


def _latent_channels(sd_model) -> int:
    unet = denoiser_module(sd_model)
    config = getattr(unet, "config", None)  # diffusers-style modules keep it there
    channels = config.get("in_channels") if isinstance(config, dict) else getattr(config, "in_channels", None)
    try:
        return int(channels if channels is not None else unet.in_channels)
    except (AttributeError, TypeError, ValueError):
        return 4


def _first_forward(model: DiffusionModel, shape) -> None:
    uncond = model.encode([""])
    sigma = model.timesteps(2)[:1].to(uncond.embedding.device)
    x = torch.zeros(1, *shape, device=uncond.embedding.device)
    model.eps(x, sigma, uncond.embedding, uncond.extra)


def ui_calibrate(prompts, band_prompts, steps, width, height):
    """Generator for the 'Calibrate this checkpoint' button: progress lines, then the result (HTML). A page that
    is closed stops the generator (GeneratorExit): the calibration is cancelled, the queue freed."""
    import html
    messages, result, cancelled = [], {}, threading.Event()

    def work():
        try:
            result["ok"] = calibrate_current(dict(prompts=prompts, band_prompts=band_prompts, steps=steps,
                                                  width=width, height=height), messages.append, cancelled=cancelled)
        except CalibrationError as e:
            result["error"] = str(e)
        except Exception as e:
            import traceback
            traceback.print_exc()
            result["error"] = f"calibration failed: {type(e).__name__}: {e}"

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    shown = None
    try:
        while thread.is_alive():
            thread.join(0.5)
            if messages and messages[-1] != shown:
                shown = messages[-1]
                yield f"<div class='memoguard-note'>{html.escape(shown)}</div>"
    finally:
        if thread.is_alive():
            cancelled.set()
    if "error" in result:
        yield f"<div class='memoguard-error'>MemoGuard calibration failed: {html.escape(result['error'])}</div>"
        return
    r = result["ok"]
    yield (f"<div>Calibrated <b>{html.escape(r['checkpoint'] or r['model_key'])}</b> ({r['model_key']}): "
           f"threshold {r['threshold']:.4f} at {r['fpr']:.1%} false positives, median {r['median']:.4f}, "
           f"{r['prompts']} prompts, band {'from ' + str(r['band_prompts']) + ' runs' if r['band'] else 'none'}, "
           f"{r['seconds']:.0f} s. Saved to {html.escape(r['saved_to'])}; the script's verdicts use it from now on."
           f"</div>")
