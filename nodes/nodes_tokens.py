"""Token Contributions: which words of the prompt drive the memorization score."""
import json

import torch
from comfy_api.latest import io, ui

from memoguard import token_contributions
from memoguard.explain import METHODS
from memoguard.host_autograd import differentiable
from memoguard.hosts import Interrupted, failure_message, is_out_of_memory, release_memory

from . import live
from .comfy_model import ComfyDiffusionModel, interrupted
from .latents import sampler_latent
from .plots import message_image, token_bars


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
            description="Per-token share of the memorization score, from the cond/uncond gap at the first "
                        "steps. Default method: gradient x input (how the gap changes when a token's text-encoder "
                        "output is emptied; measured more faithful than the paper's gradient norm, BENCHMARKS.md). "
                        "SD1.x, SD2.x and SDXL; SD3/Flux are refused with a message.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model: SD1.x, SD2.x or SDXL (not SD3/Flux)."),
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
                               tooltip="auto: gradient_x_delta (1 forward + backward). leave_one_out: one forward per "
                                       "token with its position emptied (in the embedding: it leaves the token in "
                                       "later positions, and ComfyUI's EOS padding can make every score negative). "
                                       "integrated_gradients: 4 gradients. gradient_norm: the paper's."),
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
                method="auto") -> io.NodeOutput:
        problem = input_problem(text, steps, explain_steps)
        if problem is not None:  # one message, and the rest of the workflow still runs
            return cls._message(problem)
        try:
            return cls._explain(model, clip, text, latent, seed, steps, explain_steps, cfg, scheduler, generations,
                                method)
        except Interrupted:
            import comfy.model_management
            comfy.model_management.throw_exception_if_processing_interrupted()  # ComfyUI's own cancel
            raise
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
    def _explain(cls, model, clip, text, latent, seed, steps, explain_steps, cfg, scheduler, generations, method):
        import comfy.model_management
        import comfy.sample
        import comfy.samplers

        comfy.model_management.load_models_gpu([model])
        base, device = model.model, model.load_device
        sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, scheduler, steps).to(device)
        shape_of = sampler_latent(model, latent)[:1]  # the size KSampler samples this latent at
        noise = torch.cat([comfy.sample.prepare_noise(shape_of, seed + g) for g in range(generations)])
        noise = noise.to(device)
        with differentiable(base):
            adapter = ComfyDiffusionModel(base, sigmas, clip, noise, device=device)
            cond, uncond = adapter.encode([text]), adapter.encode([""], prompt_type="negative")
            x_T = adapter.initial_x(noise)
            schedule_steps = len(sigmas) - 1  # some schedulers (ddim_uniform) add a step
            result = token_contributions(adapter, cond, uncond, x_T, steps=min(explain_steps, schedule_steps),
                                         guidance=cfg, total_steps=schedule_steps, method=method,
                                         should_stop=interrupted)[0]
        data = result.to_dict()
        top = ", ".join(f"{t} {100 * s:.0f}%" for t, s in result.top(3))
        live.show_text(f"MemoGuard: top tokens {top} ({result.method_name})", cls.hidden.unique_id)
        chart = token_bars(result.tokens, result.shares, f"{result.method_name}: {text[:50]}")
        return io.NodeOutput(chart, json.dumps(data),
                             ui={**ui.PreviewImage(chart, cls=cls).as_dict(), "memoguard_tokens": [json.dumps(data)]})
