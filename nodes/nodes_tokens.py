"""Token Contributions: which words of the prompt drive the memorization score."""
import json

import torch
from comfy_api.latest import io, ui

from memoguard import token_contributions
from memoguard.explain import METHODS
from memoguard.host_autograd import differentiable
from memoguard.hosts import Interrupted, failure_message, is_out_of_memory, release_memory

from memoguard.calibration_lookup import CHOICES, NO_FILE, run_detector

from . import live
from .calibration_choice import FILE_TOOLTIP, TOOLTIP as CALIBRATION_TOOLTIP, file_options, lookup, model_key
from .comfy_model import ComfyDiffusionModel, UnsupportedModel, interrupted
from .latents import sampler_latent
from .plots import message_image, token_bars


SUMMARY_FPR = 0.01  # the threshold the summary compares a word's removal with: the verdict's default


def input_problem(text: str, steps: int, explain_steps: int):
    """What is wrong with the inputs, in one sentence; None when they are fine."""
    if not text.strip():
        return "the text is empty: give the prompt to explain"
    if explain_steps > steps:
        return f"explain_steps ({explain_steps}) cannot exceed steps ({steps})"
    return None


class TokenContributionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers
        return io.Schema(
            node_id="MemoGuardTokenContributions",
            display_name="Token Contributions",
            category="MemoGuard",
            description="Which words of the prompt drive the memorization score, from the cond/uncond gap at the "
                        "first steps. Default: leave-one-out, the prompt encoded again by the CLIP without each "
                        "word in turn (its weights syntax kept), so a word's score is what removing it does "
                        "(BENCHMARKS.md: the most faithful measured). With a calibration it says when no single "
                        "word ends the recall. SD1.x, SD2.x, SDXL, SD3 and Flux (a word left out of every text "
                        "encoder); models whose positions are not their words say so.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model: SD1.x, SD2.x, SDXL, SD3, Flux (others: the node "
                                                      "says why not)."),
                io.Clip.Input("clip", tooltip="The text encoder that goes with the model."),
                io.String.Input("text", multiline=True, default="", tooltip="The prompt to explain."),
                io.Latent.Input("latent", tooltip="An empty latent of the size you sample at (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed, as on KSampler: same seed, same starting noise."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Length of the sampling schedule."),
                io.Int.Input("explain_steps", default=1, min=1, max=1000,
                             tooltip="How many of the first steps to average over (the paper: 1)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance used to move between explained steps."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Sigma schedule, as on KSampler."),
                io.Int.Input("generations", default=1, min=1, max=16,
                             tooltip="Average over this many noise seeds (seed, seed+1, ...)."),
                io.Combo.Input("method", options=list(METHODS), default="auto",
                               tooltip="auto: leave_one_out up to 12 words (one forward per word, the prompt "
                                       "re-encoded without it), leave_one_out_screened beyond (the 12 words a "
                                       "first-order estimate ranks first: 1 backward + 14 forwards). "
                                       "leave_one_out_grouped: by groups, no backward (14 forwards at 75 words). "
                                       "leave_one_out_embedding empties a word's positions only (it stays "
                                       "in later positions). gradient_x_delta: 1 forward + backward, a first-order "
                                       "estimate. integrated_gradients: 4 gradients. gradient_norm: the paper's."),
                io.Combo.Input("calibration", options=list(CHOICES), default=CHOICES[0], optional=True,
                               tooltip="For the summary: " + CALIBRATION_TOOLTIP + " With one, leave-one-out says "
                                       "whether removing a single word brings the first-step score under the 1% "
                                       "threshold (explain_steps 1)."),
                io.Combo.Input("calibration_file", options=file_options(), optional=True, tooltip=FILE_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="chart", tooltip="Bar chart of each token's share."),
                io.String.Output(display_name="json", tooltip="tokens, scores, shares and positions as JSON."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, text, latent, seed, steps, explain_steps, cfg, scheduler, generations,
                method="auto", calibration=CHOICES[0], calibration_file=NO_FILE) -> io.NodeOutput:
        problem = input_problem(text, steps, explain_steps)
        if problem is not None:  # one message, and the rest of the workflow still runs
            return cls._message(problem)
        try:
            return cls._explain(model, clip, text, latent, seed, steps, explain_steps, cfg, scheduler, generations,
                                method, lookup(calibration, calibration_file))
        except Interrupted:
            import comfy.model_management
            comfy.model_management.throw_exception_if_processing_interrupted()  # ComfyUI's own cancel
            raise
        except UnsupportedModel as e:  # a model whose positions are not its words: said on the node, queue goes on
            return cls._message(str(e))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            message = failure_message("explaining tokens", e)
            release_memory(e)
        return cls._message(message)

    @classmethod
    def _message(cls, problem: str) -> io.NodeOutput:
        live.show_text(f"MemoGuard: {problem}", cls.hidden.unique_id)
        chart = message_image(f"Token Contributions: {problem}")
        data = json.dumps({"error": problem})
        return io.NodeOutput(chart, data, ui={**ui.PreviewImage(chart, cls=cls).as_dict(),
                                              "memoguard_tokens": [data], "text": [problem]})

    @classmethod
    def _explain(cls, model, clip, text, latent, seed, steps, explain_steps, cfg, scheduler, generations, method,
                 source):
        import comfy.model_management
        import comfy.sample
        import comfy.samplers

        comfy.model_management.load_models_gpu([model])
        base, device = model.model, model.load_device
        sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, scheduler, steps).to(device)
        shape_of = sampler_latent(model, latent)[:1]  # the size KSampler samples this latent at
        noise = torch.cat([comfy.sample.prepare_noise(shape_of, seed + g) for g in range(generations)])
        noise = noise.to(device)
        found = source.resolve(model_key(base))
        with differentiable(base):
            adapter = ComfyDiffusionModel(base, sigmas, clip, noise, device=device)
            cond, uncond = adapter.encode([text]), adapter.encode([""], prompt_type="negative")
            x_T = adapter.initial_x(noise)
            schedule_steps = len(sigmas) - 1  # some schedulers (ddim_uniform) add a step
            result = token_contributions(adapter, cond, uncond, x_T, steps=min(explain_steps, schedule_steps),
                                         guidance=cfg, total_steps=schedule_steps, method=method,
                                         should_stop=interrupted, detector=run_detector(found.calibration))[0]
        # the calibration holds first-step scores: a summary over more steps compares nothing with it
        first_step_only = found.calibration is not None and explain_steps == 1
        threshold = found.calibration.threshold(SUMMARY_FPR) if first_step_only else None
        summary = result.summary(threshold)
        data = {**result.to_dict(), "summary": summary, "threshold": threshold, "calibration": found.message}
        live.show_text(f"MemoGuard: {summary}" + ("" if threshold is not None else f" ({found.message})"),
                       cls.hidden.unique_id)
        chart = token_bars(result.tokens, result.shares, f"{result.method_name}: {text[:50]}")
        return io.NodeOutput(chart, json.dumps(data),
                             ui={**ui.PreviewImage(chart, cls=cls).as_dict(), "memoguard_tokens": [json.dumps(data)]})
