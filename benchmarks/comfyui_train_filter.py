"""The training filter inside the real ComfyUI's Train LoRA node: does the filtered LoRA copy less?

    COMFYUI_DIR=/work/hosts/ComfyUI /work/hosts/comfy-venv/bin/python benchmarks/comfyui_train_filter.py \
        --json benchmarks/comfyui_train_filter.json

The bundled model (MemoGuard Tiny Model Loader's objects) gets a LoRA trained by ComfyUI's own Train LoRA node
(comfy_extras/nodes_train.py, batch 1, its default) on the data of `train-filter-demo`: ordinary training pairs
plus new scenes, each with a unique speck pattern and a title of words the model never saw, duplicated many times.
Arms, with the same sample order and noise (ComfyUI draws them from the global torch generator, reseeded before
each run): plain; MemoGuard Training Filter with its defaults between the model and Train LoRA ("filtered": samples
with an unusual gap dropped, captions dropped too often barred). Each LoRA'd model then samples the duplicated captions (8 seeds, DDIM 50, cfg 3, ComfyUI's
KSampler) and ordinary training captions; copy rate and alignment are memoguard.tiny.judge's. Seconds per step:
each arm's training wall time / steps, the arms run one after another on the same machine.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_host import load_comfy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12000, help="Train LoRA steps (batch 1)")
    ap.add_argument("--ordinary", type=int, default=400, help="ordinary training pairs")
    ap.add_argument("--duplicates", type=int, default=100, help="copies of each new scene")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=8, help="generations per duplicated caption")
    args = ap.parse_args()
    load_comfy()
    import comfy_extras.nodes_train as train
    import nodes as comfy_nodes  # ComfyUI's (the pack's own package is memoguard_pack.nodes)
    from transformers import CLIPTokenizer
    from memoguard.cli.filter_demo import DemoSettings, finetune_data
    from memoguard.resources import asset_path
    from memoguard.tiny.judge import alignment, is_copy
    from memoguard_pack.nodes import tiny_loader
    from memoguard_pack.nodes.nodes_training_filter import MemoGuardTrainingFilter, MemoGuardTrainingFilterReport

    t_start = time.perf_counter()
    settings = DemoSettings(duplicates=args.duplicates)
    data = finetune_data(CLIPTokenizer.from_pretrained(asset_path("tiny-sd") / "tokenizer"), settings, 0)
    rows = np.r_[np.flatnonzero(~data.is_duplicated)[:args.ordinary], np.flatnonzero(data.is_duplicated)]
    images, captions = data.images[rows], [data.captions[i] for i in rows]
    clip = tiny_loader.load_clip()
    encoded = {}

    def encode(text):
        if text not in encoded:
            encoded[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return encoded[text]

    positive = [encode(c)[0] for c in captions]

    def generate(model, texts, seeds):
        out = []
        for text in texts:
            for seed in seeds:
                (res,) = comfy_nodes.common_ksampler(model, seed, 50, 3.0, "ddim", "ddim_uniform", encode(text),
                                                     encode(""), {"samples": torch.zeros(1, 3, 16, 16)})
                out.append(res["samples"][0])
        return ((torch.stack(out).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()

    def judge(model) -> dict:
        dup = generate(model, data.duplicated_captions, range(args.seeds))
        ordinary = generate(model, data.ordinary_captions, [0])
        return {"copy_rate_duplicated": float(is_copy(dup, data.unique_images).mean()),
                "alignment_ordinary": float(alignment(ordinary, data.ordinary_scenes).mean())}

    results = {"base": judge(tiny_loader.load_model())}
    for arm, bar_alpha in (("plain", None), ("filtered", 1e-4)):
        model = tiny_loader.load_model()
        t0 = time.perf_counter()
        if bar_alpha is not None:
            (model,) = MemoGuardTrainingFilter.execute([model], [clip], [{"samples": images}], positive,
                                                       bar_alpha=[bar_alpha]).args
        fitted = time.perf_counter() - t0
        torch.manual_seed(0)  # Train LoRA's sample order and noise: the same in every arm
        t0 = time.perf_counter()
        trained, _, loss, _ = train.TrainLoraNode().train(
            model, {"samples": images}, positive, batch_size=1, grad_accumulation_steps=1, steps=args.steps,
            learning_rate=args.learning_rate, rank=args.rank, optimizer="AdamW", loss_function="MSE", seed=0,
            training_dtype="fp32", lora_dtype="fp32", algorithm=list(train.adapter_maps)[0],
            gradient_checkpointing=False, existing_lora="[None]")
        seconds = time.perf_counter() - t0
        results[arm] = {**judge(trained), "seconds_per_step": seconds / args.steps, "filter_fit_seconds": fitted,
                        "train_loss_last_tenth": float(np.mean(loss["loss"][-args.steps // 10:]))}
        if bar_alpha is not None:
            report = json.loads(MemoGuardTrainingFilterReport.execute(model, args.steps).args[0])
            duplicated = set(np.flatnonzero(data.is_duplicated[rows]).tolist())
            results[arm]["filter"] = {**report, "barred_images_all_duplicated": all(
                set(b["images"]) <= duplicated for b in report["barred"])}
        print(arm, {k: v for k, v in results[arm].items() if k != "filter"}, flush=True)
    plain, filtered = results["plain"], results["filtered"]
    summary = {"copy_rate_ratio": filtered["copy_rate_duplicated"] / plain["copy_rate_duplicated"]
               if plain["copy_rate_duplicated"] else None,
               "alignment_ratio": filtered["alignment_ordinary"] / plain["alignment_ordinary"],
               "step_time_ratio": filtered["seconds_per_step"] / plain["seconds_per_step"]}
    print(summary)
    args.json.write_text(json.dumps({"comfyui": os.environ["COMFYUI_DIR"], "settings": vars(args) | {"json": str(args.json)},
                                     "pairs": len(captions), "duplicated_pairs": int(data.is_duplicated[rows].sum()),
                                     "models": results, "summary": summary,
                                     "seconds_total": time.perf_counter() - t_start,
                                     "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
