"""Token Contributions and Embedding Minimization on a tiny SDXL model inside a real ComfyUI.

Run by test_real_host.py with ComfyUI's Python and COMFYUI_DIR; prints one JSON line. The model is
ComfyUI's own SDXL class (supported_models.SDXL, model_base.SDXL: y = pooled text + size ids via
encode_adm) with a small UNet and random weights, paired with MemoGuard's tiny CLIP (width 64).
"""
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from comfyui_host import load_comfy  # noqa: E402

TEXT = "a purple ring, lighthouse poster"
WEIGHTED, WEIGHTED_WITHOUT = "a (purple:1.3) ring, lighthouse poster", "a (purple:1.3) ring, poster"
# 74 tokens, then a weighted group of 2 that ComfyUI moves whole into the second chunk; without "lighthouse" it
# fits the first: typed alone, the prompt is chunked otherwise than its tokens left out in place
LONG = "a purple ring, lighthouse poster" + " red" * 68 + " (blue sky:1.2)" + " red" * 10
# 76 tokens, two chunks; without "lighthouse" 75, one
LOSES_A_CHUNK = "a purple ring, lighthouse poster" + " red" * 70
STEPS = 4


def tiny_sdxl(pooled_channels: int):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SDXL({
        "model_channels": 32, "use_linear_in_transformer": True, "context_dim": 64, "num_classes": "sequential",
        "adm_in_channels": pooled_channels + 6 * 256, "use_temporal_attention": False, "in_channels": 4,
        "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
        "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "use_checkpoint": False,
        "image_size": 32, "use_spatial_transformer": True, "legacy": False})
    model = config.get_model({})
    torch.manual_seed(0)
    with torch.no_grad():  # comfy.ops skips initialisation
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
            else:  # 1-d weights are norm scales
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def main():
    load_comfy()
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    from comfy_api.latest import io
    from memoguard import step_score
    from memoguard_pack.nodes import tiny_loader
    from memoguard.host_autograd import differentiable
    from memoguard_pack.nodes.comfy_model import ComfyDiffusionModel
    from memoguard_pack.nodes.mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation
    from memoguard_pack.nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
    from memoguard_pack.nodes.nodes_tokens import TokenContributionsNode

    quiet = dict(emit=lambda e, d: None, show=lambda t, n: None)
    out = {}
    with torch.inference_mode():  # as ComfyUI executes nodes
        clip = tiny_loader.load_clip()
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        model = tiny_sdxl(positive[0][1]["pooled_output"].shape[-1])
        out["model"] = type(model.model).__name__
        latent = torch.zeros(1, 4, 16, 16)
        noise = comfy.sample.prepare_noise(latent, 0)
        run = lambda m: comfy.sample.sample(m, noise, STEPS, 7.5, "euler", "normal", positive, negative, latent,
                                            disable_pbar=True, seed=0)

        monitor = MonitorSession(MonitorSettings(), **quiet)
        run(attach_monitor(model, monitor))
        out["sampler_first_step"] = monitor.trace.per_step()[0].tolist()

        # the adapter's own route (what Token Contributions uses): CLIP -> extra_conds -> y
        comfy.model_management.load_models_gpu([model])
        base = model.model
        sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "normal", STEPS)
        with differentiable(base):
            adapter = ComfyDiffusionModel(base, sigmas, clip, noise)
            cond, uncond = adapter.encode([TEXT]), adapter.encode([""], prompt_type="negative")
            eps_c, eps_u = adapter.eps_pair(adapter.initial_x(noise), sigmas[0], cond, uncond)
            # a word left out through ComfyUI's own tokenizer and weights syntax: the prompt typed without it
            weighted = adapter.encode([WEIGHTED])
            edited = adapter.encode_without(weighted, [(0, weighted.word_groups(0)[4])])
            typed, unweighted = adapter.encode([WEIGHTED_WITHOUT]), adapter.encode([WEIGHTED_WITHOUT.replace("(purple:1.3)", "purple")])
            long, loses = adapter.encode([LONG]), adapter.encode([LOSES_A_CHUNK])
            long_edited = adapter.encode_without(long, [(0, long.word_groups(0)[4])])
            long_typed = adapter.encode([LONG.replace(" lighthouse", "")])
            lost = adapter.encode_without(loses, [(0, loses.word_groups(0)[4])])
            alone = adapter.encode([LOSES_A_CHUNK.replace(" lighthouse", "")])
            x = adapter.initial_x(noise)
            eps_lost, eps_alone = (adapter.eps(x, sigmas[0], e.embedding, e.extra) for e in (lost, alone))
        out["long"] = {
            "tokens": [c.tolist().count(True) for c in long.prompt_mask], "length": long.embedding.shape[1],
            "group_moved": clip.tokenize(LONG)["l"][0][-2][0] == clip.tokenize("")["l"][0][-1][0],
            "edited_vs_typed": float((long_edited.embedding - long_typed.embedding).abs().max()),
            "y_vs_typed": float((long_edited.extra["y"] - long_typed.extra["y"]).abs().max()),
            "padded": long_edited.padded, "lost_length": [lost.embedding.shape[1], alone.embedding.shape[1]],
            "lost_padded": lost.padded, "lost_eps_vs_typed": float((eps_lost - eps_alone).abs().max()),
            "eps_scale": float(eps_alone.abs().max())}
        out["y_shape"] = list(cond.extra["y"].shape)
        out["adapter_first_step"] = step_score(eps_c - eps_u).tolist()
        out["reencode"] = {"words": ["".join(weighted.tokens[0][i] for i in g) for g in weighted.word_groups(0)],
                           "edited_vs_typed": float((edited.embedding - typed.embedding).abs().max()),
                           "weight_effect": float((typed.embedding - unweighted.embedding).abs().max())}

        hidden = {io.Hidden.unique_id: "10"}
        takes_v3_data = "v3_data" in inspect.signature(TokenContributionsNode.PREPARE_CLASS_CLONE).parameters
        node = TokenContributionsNode.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if takes_v3_data else hidden)
        _, data = node.execute(model, clip, TEXT, {"samples": latent}, 0, STEPS, 2, 7.5, "normal", 1).result
        out["tokens"] = json.loads(data)
        _, data = node.execute(model, clip, TEXT, {"samples": latent}, 0, STEPS, 2, 7.5, "normal", 1,
                               "gradient_x_delta").result
        out["tokens_gradient"] = json.loads(data)

        session = MitigationSession(MitigationSettings(mitigation="always", strategy="minimize", max_iters=5), **quiet)
        after_monitor = MonitorSession(MonitorSettings(), **quiet)
        run(attach_monitor(attach_mitigation(model, session), after_monitor))
        out["mitigation"] = {"error": session.error, **session.record.to_dict(),
                             "sampler_first_step": after_monitor.trace.per_step()[0].tolist()}

        # out of memory inside MemoGuard's gradient passes (the sampler's own calls go through): plain image
        plain = run(model)
        inner = base.apply_model
        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

        def apply_model(x, t, **kwargs):
            if kwargs["c_crossattn"].requires_grad:
                raise oom("CUDA out of memory. Tried to allocate 3.00 GiB (injected)")
            return inner(x, t, **kwargs)
        base.apply_model = apply_model
        try:
            failing = MitigationSession(MitigationSettings(mitigation="always", strategy="minimize", max_iters=5),
                                        **quiet)
            image = run(attach_mitigation(model, failing))
            _, tokens = node.execute(model, clip, TEXT, {"samples": latent}, 0, STEPS, 2, 7.5, "normal", 1,
                                     "gradient_x_delta").result  # the route with a backward pass
        finally:
            del base.apply_model
        out["out_of_memory"] = {"error": failing.error, "plain_image": bool(torch.equal(image, plain)),
                                "tokens": json.loads(tokens)}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
