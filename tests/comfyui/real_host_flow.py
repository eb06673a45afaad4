"""Today's flow models inside a real ComfyUI: SD3, Flux (dev and schnell), Chroma, Qwen-Image.

Run by test_real_host.py with ComfyUI's Python and COMFYUI_DIR; prints one JSON line. Each model is ComfyUI's own
class (comfy.supported_models / comfy.model_base) with a tiny config and random normal weights, conditioned by
MemoGuard's tiny CLIP (width 64): the families' own text encoders (T5-XXL, CLIP-G, Qwen2.5-VL) have their sizes
fixed in ComfyUI's config files and cannot be built small. Per model: the Monitor's score and the image beside an
unmonitored run, a calibration made through the Calibrate node's code and the verdict it gives, that calibration
never serving the next model, Token Contributions, and token removal in the sampler.
"""
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from comfyui_host import load_comfy  # noqa: E402

TEXT = "a purple ring, lighthouse poster"
PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "cross")]
STEPS, CFG = 4, 3.0


def tiny_configs(context: int, pooled: int) -> dict:
    """{name: (supported_models class name, unet config, the network's parameter class or None)}: the keys each
    ComfyUI version's network accepts are kept (v0.3.64's Flux has no txt_ids_dims)."""
    flux = dict(in_channels=16, out_channels=16, vec_in_dim=pooled, context_in_dim=context, hidden_size=64,
                mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                patch_size=2, qkv_bias=True, txt_ids_dims=[])
    return {
        "sd3": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, pos_embed_max_size=16,
                            num_patches=256, adm_in_channels=pooled, pos_embed_scaling_factor=None,
                            context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": context, "out_features": 128}}),
                None),
        "flux": ("Flux", dict(flux, image_model="flux", guidance_embed=True), "comfy.ldm.flux.model.FluxParams"),
        "flux_schnell": ("FluxSchnell", dict(flux, image_model="flux", guidance_embed=False),
                         "comfy.ldm.flux.model.FluxParams"),
        "chroma": ("Chroma", dict(flux, image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=64,
                                  hidden_dim=64, n_layers=1, vec_in_dim=None), "comfy.ldm.chroma.model.ChromaParams"),
        "flux2_klein": ("Flux2", dict(flux, image_model="flux2", in_channels=128, out_channels=128, patch_size=1,
                                      axes_dim=[8, 8, 8, 8], mlp_ratio=3.0, theta=2000, global_modulation=True,
                                      mlp_silu_act=True, qkv_bias=False, ops_bias=False, default_ref_method="index",
                                      ref_index_scale=10.0, txt_ids_dims=[3], vec_in_dim=None, guidance_embed=False),
                        "comfy.ldm.flux.model.FluxParams"),
        "z_image": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=1,
                                   n_refiner_layers=1, n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12],
                                   axes_lens=[300, 512, 512], cap_feat_dim=context, qk_norm=True, z_image_modulation=True,
                                   time_scale=1000.0, pad_tokens_multiple=32), None),
        "qwen_image": ("QwenImage", dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16,
                                         num_layers=1, attention_head_dim=32, num_attention_heads=2,
                                         joint_attention_dim=context, axes_dims_rope=(8, 12, 12)), None),
    }


# the families' own text encoders at toy size: ComfyUI's CLIP and T5 classes with small configs, composed as the
# families feed their DiTs (Flux: T5 positions, CLIP-L pooled; SD3: CLIP-L|G positions then T5's, both pooled)
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
             "projection_dim": 32, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}
TINY_T5 = {"d_ff": 64, "d_kv": 16, "d_model": 64, "num_heads": 2, "num_layers": 1, "vocab_size": 32128,
           "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5", "layer_norm_epsilon": 1e-6,
           "relative_attention_num_buckets": 32}


def own_encoders(family: str, seed: int):
    """(ComfyUI CLIP object with the family's own tokenizer and toy encoders, conditioning width, pooled width)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.t5

    def clip_model(pad, **kw):
        return comfy.sd1_clip.SDClipModel(textmodel_json_config=TINY_CLIP, return_projected_pooled=False,
                                          special_tokens={"start": 49406, "end": 49407, "pad": pad}, **kw)

    def t5_model(**kw):
        return comfy.sd1_clip.SDClipModel(textmodel_json_config=TINY_T5, model_class=comfy.text_encoders.t5.T5,
                                          special_tokens={"end": 1, "pad": 0}, **kw)

    class Encoders(torch.nn.Module):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__()
            kw = dict(device=device, dtype=dtype, model_options=model_options)
            self.clip_l, self.t5xxl = clip_model(49407, **kw), t5_model(**kw)
            self.clip_g = clip_model(0, **kw) if family == "sd3" else None
            self.dtypes = {dtype}
            torch.manual_seed(seed)
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.normal_(0, 0.5 if "embed" in name or "shared" in name else 0.1) if p.dim() > 1 else \
                        p.fill_(1.0 if name.endswith("weight") else 0.0)

        def parts(self):
            return [m for m in (self.clip_l, self.clip_g, self.t5xxl) if m is not None]

        def set_clip_options(self, options):
            for m in self.parts():
                m.set_clip_options(options)

        def reset_clip_options(self):
            for m in self.parts():
                m.reset_clip_options()

        def encode_token_weights(self, tokens):
            t5, _ = self.t5xxl.encode_token_weights(tokens["t5xxl"])[:2]
            l_out, l_pooled = self.clip_l.encode_token_weights(tokens["l"])[:2]
            if family == "flux":
                return t5, l_pooled
            g_out, g_pooled = self.clip_g.encode_token_weights(tokens["g"])[:2]
            return torch.cat([torch.cat([l_out, g_out], dim=-1), t5], dim=1), torch.cat([l_pooled, g_pooled], dim=-1)

        def load_sd(self, sd):
            return self.load_state_dict(sd, strict=False)

    tokenizer = comfy.text_encoders.flux.FluxTokenizer if family == "flux" else comfy.text_encoders.sd3_clip.SD3Tokenizer
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, Encoders))
    width = TINY_CLIP["hidden_size"] * (1 if family == "flux" else 2)
    return clip, TINY_T5["d_model"], width


def build(class_name: str, config: dict, params: str, seed: int):
    import importlib
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    if params is not None:
        module, _, name = params.rpartition(".")
        fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
        config = {k: v for k, v in config.items() if k in fields or k == "image_model"}
    model = getattr(comfy.supported_models, class_name)(config).get_model({})
    torch.manual_seed(seed)
    with torch.no_grad():  # comfy.ops skips initialisation: normal weights, unit norms, no all-zero layer
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
        for name, b in model.diffusion_model.named_buffers():
            if name.endswith("pos_embed"):  # SD3's position table is a buffer
                b.normal_(0, 0.05)
    return comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def main():
    load_comfy()
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    from comfy_api.latest import io
    from memoguard import Calibration
    from memoguard_pack.nodes import tiny_loader
    from memoguard_pack.nodes.calibration_choice import lookup, model_key
    from memoguard_pack.nodes.calibration_run import calibrate_loaded
    from memoguard.host_autograd import differentiable
    from memoguard_pack.nodes.comfy_model import ComfyDiffusionModel, with_prompt_source
    from memoguard_pack.nodes.mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation
    from memoguard_pack.nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
    from memoguard_pack.nodes.nodes_tokens import TokenContributionsNode

    quiet = dict(emit=lambda e, d: None, show=lambda t, n: None)
    hidden = {io.Hidden.unique_id: "10"}
    takes_v3_data = "v3_data" in inspect.signature(TokenContributionsNode.PREPARE_CLASS_CLONE).parameters
    tokens_node = TokenContributionsNode.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if takes_v3_data else hidden)
    out, previous_folder = {}, None
    with torch.inference_mode(), TemporaryDirectory() as folders:  # as ComfyUI executes nodes
        clip = tiny_loader.load_clip()
        first = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
        context, pooled = first[0][0].shape[-1], first[0][1]["pooled_output"].shape[-1]
        families = [(name, spec, clip) for name, spec in tiny_configs(context, pooled).items()]
        for own in ("sd3", "flux"):  # the families' own tokenizers and toy encoders
            own_clip, own_context, own_pooled = own_encoders(own, 100)
            families.append((f"{own}_own_encoders", tiny_configs(own_context, own_pooled)[own], own_clip))
        for seed, (name, (class_name, config, params), clip) in enumerate(families):
            encode = lambda text, clip=clip: clip.encode_from_tokens_scheduled(clip.tokenize(text))
            positive, negative = with_prompt_source(encode(TEXT), TEXT, clip), encode("")
            if not hasattr(comfy.supported_models, class_name):
                out[name] = {"absent": f"this ComfyUI has no {class_name}"}
                continue
            model = build(class_name, config, params, seed)
            channels = model.model.latent_format.latent_channels
            shape = (1, channels, 1, 16, 16) if name == "qwen_image" else (1, channels, 16, 16)  # Qwen: video
            latent = torch.zeros(shape)
            noise = comfy.sample.prepare_noise(latent, 0)
            sample = lambda m, cfg=CFG, pos=positive: comfy.sample.sample(
                m, noise, STEPS, cfg, "euler", "simple", pos, negative, latent, disable_pbar=True, seed=0)
            row = {"class": type(model.model).__name__, "prediction_type": model.model.model_type.name}
            plain = sample(model)
            row["prompt_changes_image"] = float((sample(model, pos=encode("a green field")) - plain).abs().max())
            monitor = MonitorSession(MonitorSettings(), **quiet)
            row["bit_identical"] = bool(torch.equal(sample(attach_monitor(model, monitor)), plain))
            row["first_step"] = monitor.trace.per_step()[0].tolist()
            row["first_sigma"] = float(monitor.trace.to_dict()["t"][0])

            folder = Path(folders) / name
            sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "simple", STEPS)
            made = calibrate_loaded(model, clip, shape[1:], sigmas, PROMPTS, folder, cfg=CFG, band_prompts=2, seed=0,
                                    batch_size=4, scheduler="simple")
            cal = Calibration.load(made.path, model_key(model.model))
            row["calibration"] = {k: cal.conditions.get(k)
                                  for k in ("prediction", "noise_level", "latent", "embedded_guidance")}
            row["calibration_scores"] = cal.scores
            judged = MonitorSession(MonitorSettings(calibration=lookup("auto", folders=[folder])), **quiet)
            sample(attach_monitor(model, judged), pos=with_prompt_source(encode(PROMPTS[0]), PROMPTS[0], clip))
            (verdict,) = judged.final_verdicts()
            row["verdict"] = {"label": verdict.label, "score": verdict.score, "notes": verdict.notes,
                              "threshold": verdict.threshold, "calibrated_threshold": cal.threshold(0.01)}
            if previous_folder is not None:  # the previous model's calibration, offered to this one
                other = MonitorSession(MonitorSettings(calibration=lookup("auto", folders=[previous_folder])), **quiet)
                sample(attach_monitor(model, other))
                row["other_models_calibration"] = other.final_verdicts()[0].label
            previous_folder = folder

            if name == "flux":  # FluxGuidance 2 on the prompt: not the guidance the calibration encoded
                guided = [[c, {**o, "guidance": 2.0}] for c, o in encode(PROMPTS[0])]
                other = MonitorSession(MonitorSettings(calibration=lookup("auto", folders=[folder])), **quiet)
                sample(attach_monitor(model, other), pos=guided)
                row["guidance_2_notes"] = other.final_verdicts()[0].notes
            if name == "flux_schnell":  # guidance-distilled: sampled at cfg 1
                cfg1 = MonitorSession(MonitorSettings(), **quiet)
                image = sample(attach_monitor(model, cfg1), cfg=1.0)
                row["cfg1"] = {"bit_identical": bool(torch.equal(image, sample(model, cfg=1.0))),
                               "first_step": cfg1.trace.per_step()[0].tolist(), "notes": list(cfg1.ctx.notes)}

            _, data = tokens_node.execute(model, clip, TEXT, {"samples": latent}, 0, STEPS, 1, CFG, "simple",
                                          1).result
            row["tokens"] = json.loads(data)
            if name.endswith("_own_encoders"):  # a word left out = the prompt typed without it, in every stream
                with differentiable(model.model):
                    adapter = ComfyDiffusionModel(model.model, sigmas, clip, noise)
                    cond = adapter.encode([TEXT])
                    words = cond.word_groups(0)
                    edited = adapter.encode_without(cond, [(0, words[4])])  # "lighthouse"
                    typed = adapter.encode([TEXT.replace(" lighthouse", "")])
                row["reencode"] = {"words": ["".join(cond.tokens[0][i] for i in g) for g in words],
                                   "positions": [len(g) for g in words], "length": cond.embedding.shape[1],
                                   "edited_vs_typed": float((edited.embedding - typed.embedding).abs().max()),
                                   "pooled_vs_typed": float(max((edited.extra[k] - typed.extra[k]).abs().max()
                                                                for k in typed.extra)),
                                   "effect": float((edited.embedding - cond.embedding).abs().max())}
                clip_positions = adapter.clip_positions_of(TEXT, cond.embedding.shape[1])  # SD3: its CLIP chunk's
                row["reencode"]["clip_padding"] = (None if clip_positions is None else clip_positions - 2 - int(
                    cond.prompt_mask[0, :clip_positions].sum()))  # after BOS, the prompt and the end-of-text
            auto = MitigationSession(MitigationSettings(mitigation="always", strategy="auto"), **quiet)
            sample(attach_mitigation(model, auto))
            row["auto_strategy"] = {"strategy": auto.record.strategy if auto.record else None, "notes": auto.notes,
                                    "error": auto.error, "masked": auto.record.masked if auto.record else None}
            session = MitigationSession(MitigationSettings(mitigation="always", strategy="remove_tokens"), **quiet)
            after = MonitorSession(MonitorSettings(), **quiet)
            sample(attach_monitor(attach_mitigation(model, session), after))
            row["mitigation"] = {"error": session.error, "ran": session.record is not None and session.record.ran,
                                 "before": session.record.before if session.record else None,
                                 "after": session.record.after if session.record else None,
                                 "removed": session.record.removed if session.record else None,
                                 "sampler_first_step": after.trace.per_step()[0].tolist()}
            out[name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
