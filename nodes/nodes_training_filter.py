"""MemoGuard Training Filter (+ Report): the paper's training-time mitigation inside ComfyUI's Train LoRA node."""
import json

from comfy_api.latest import io

from .training_filter_hook import WRAPPER_OPTION, TrainingFilterHook, fit_filter, report_text


class MemoGuardTrainingFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardTrainingFilter",
            display_name="MemoGuard Training Filter",
            category="MemoGuard",
            description="Put between the model and Train LoRA (same latents and captions): while it trains, each "
                        "sample whose memorization gap (the caption's pull against the empty prompt's, relative "
                        "to an ordinary sample's at the same noise level) is unusually high is left out of the "
                        "loss, and a caption whose samples are left out far more often than an ordinary caption's "
                        "could be is barred for the rest of the run (Wen et al. 2024; duplicated images are what "
                        "LoRAs copy). Cost: one extra forward without gradients per training step, and "
                        "reference_samples x 2 forwards before training. Sampling with the model is unchanged. "
                        "Train LoRA at batch_size 1 (its default): this ComfyUI pairs every caption of a larger "
                        "batch with every image of it.",
            inputs=[
                io.Model.Input("model", tooltip="The model you train the LoRA on (the same one Train LoRA gets)."),
                io.Clip.Input("clip", tooltip="Its text encoder: the empty prompt is encoded with it."),
                io.Latent.Input("latents", tooltip="The training latents, as given to Train LoRA."),
                io.Conditioning.Input("positive", tooltip="The training captions, as given to Train LoRA."),
                io.Float.Input("drop_share", default=0.05, min=0.001, max=0.5, step=0.001,
                               tooltip="Share of ordinary samples dropped by design: the threshold sits at this "
                                       "share of the gaps measured before training (the measured default: 5%)."),
                io.Float.Input("bar_alpha", default=1e-4, min=0.0, max=0.1, step=1e-5,
                               tooltip="Bar a caption once its samples were dropped so often that an ordinary "
                                       "caption would be this improbable (binomial tail). 0: never bar, judge each "
                                       "sample alone (the paper's filter; it stopped far fewer copies)."),
                io.Int.Input("count_after", default=100, min=0, max=100000,
                             tooltip="Training steps before captions are counted for barring: new words score high "
                                     "before they are learned, not because they are memorized."),
                io.Int.Input("reference_samples", default=512, min=160, max=100000,
                             tooltip="Dataset samples (random noise level, as Train LoRA draws them) measured before "
                                     "training for the ordinary gap of each noise band and the threshold."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the reference samples' images, noise levels and noise."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the filter: connect it to Train LoRA's model input.")],
            is_input_list=True,  # as Train LoRA takes them: dataset nodes hand over lists (images, captions, sizes)
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return float("nan")  # never reused from the cache: its record is of one training run

    @classmethod
    def execute(cls, model, clip, latents, positive, drop_share=(0.05,), bar_alpha=(1e-4,), count_after=(100,),
                reference_samples=(512,), seed=(0,)) -> io.NodeOutput:
        import comfy.model_management
        model, clip = model[0], clip[0]
        comfy.model_management.load_models_gpu([model])
        hook = fit_filter(model, clip, [latent["samples"] for latent in latents], positive,
                          drop_share=drop_share[0], bar_alpha=bar_alpha[0], count_after=count_after[0],
                          reference_samples=reference_samples[0], seed=seed[0])
        patched = model.clone()
        patched.set_model_unet_function_wrapper(hook)
        return io.NodeOutput(patched)


class MemoGuardTrainingFilterReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardTrainingFilterReport",
            display_name="MemoGuard Training Filter Report",
            category="MemoGuard",
            description="What the training filter did: samples dropped, and the captions it barred, named by their "
                        "images' positions in the training set (a list to deduplicate the dataset with). Connect the "
                        "filter's model and any output of Train LoRA.",
            inputs=[io.Model.Input("model", tooltip="MemoGuard Training Filter's output (the filter's record travels "
                                                    "with it; Train LoRA's model_with_lora, where it has one, too)."),
                    io.AnyType.Input("trained", tooltip="Any output of Train LoRA (its steps, say): the report then "
                                                        "runs after training.")],
            outputs=[io.String.Output(display_name="json", tooltip="The report as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, trained=None) -> io.NodeOutput:
        hook = model.model_options.get(WRAPPER_OPTION)
        report = hook.report() if isinstance(hook, TrainingFilterHook) else None
        text = report_text(report)
        return io.NodeOutput(json.dumps(report), ui={"memoguard_filter_report": [text]})
