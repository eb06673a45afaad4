"""MemoGuard Calibrate: what score is normal for the loaded model, measured through ComfyUI's own model call."""
from comfy_api.latest import io

from . import live
from .calibration_choice import calibration_folders
from .calibration_run import calibrate_loaded, prompt_list
from .latents import sampler_latent


class MemoGuardCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers
        return io.Schema(
            node_id="MemoGuardCalibrate",
            display_name="MemoGuard Calibrate",
            category="MemoGuard",
            description="Scores benign prompts on the loaded model (with its LoRAs) at the sampler's first step, "
                        "plus a benign band along whole runs, and saves the calibration to models/memoguard under "
                        "the fingerprint of the weights: Memorization Monitor 'auto' then uses it for this model only. "
                        "Cost: 1 model evaluation per prompt (the unconditional one is shared) + 2 x steps per "
                        "band prompt.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate, as your sampler gets it (after LoRA loaders)."),
                io.Clip.Input("clip", tooltip="The text encoder that goes with the model."),
                io.Latent.Input("latent", tooltip="An empty latent of the size you sample at (e.g. Empty Latent Image): "
                                "the score depends on it."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Steps of the schedule you sample with: with the scheduler it fixes the first "
                                     "sigma, where the verdict is measured."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Sigma schedule, as on your KSampler."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance of the benign band's runs: use your KSampler's cfg (the band's shape "
                                       "depends on it; the first-step verdict does not)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Benign prompts, one per line (at least 10). Empty: MemoGuard's shipped list "
                                        "of about 300 ordinary prompts."),
                io.Int.Input("band_prompts", default=32, min=0, max=1000,
                             tooltip="How many of the prompts also get a full guided run for the benign band drawn "
                                     "under the Monitor's chart (0: no band; each costs 2 x steps evaluations)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="First noise seed of the benign runs: each prompt is scored at this seed and "
                                     "the next 3, each generation a benign score (a threshold whose false-positive "
                                     "rate holds for single images at other seeds)."),
                io.Int.Input("batch_size", default=16, min=1, max=512,
                             tooltip="Prompts per model call (lower it if you run out of memory)."),
            ],
            outputs=[io.String.Output(display_name="summary", tooltip="Model key, prompts, threshold at 1% false "
                                      "positives and where the calibration was saved.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latent, steps, scheduler, cfg, prompts, band_prompts, seed,
                batch_size) -> io.NodeOutput:
        import comfy.model_management
        import comfy.samplers
        import comfy.utils

        node_id = cls.hidden.unique_id
        texts = prompt_list(prompts)
        comfy.model_management.load_models_gpu([model])  # patches (LoRAs) baked in: they count in the key
        sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, scheduler, steps)
        shape = tuple(sampler_latent(model, latent).shape[1:])
        band = min(band_prompts, len(texts))
        total = len(texts) + band
        bar = comfy.utils.ProgressBar(total)
        offsets = {"first step": 0, "band": len(texts)}

        def progress(stage, done, _total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(offsets.get(stage, 0) + done, total)
            live.show_text(f"MemoGuard: calibrating, {stage} {done}/{_total}", node_id)

        folders = calibration_folders()
        result = calibrate_loaded(model, clip, shape, sigmas, texts, folders[0], cfg=cfg, band_prompts=band,
                                  seed=seed, batch_size=batch_size, scheduler=scheduler, progress=progress)
        live.show_text(f"MemoGuard: {result.summary}", node_id)
        return io.NodeOutput(result.summary, ui={"text": [result.summary]})
