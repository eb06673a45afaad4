"""Copy Evidence: the training image each generation is nearest to, shown beside it, with the copy verdict."""
import json

from comfy_api.latest import io, ui

from memoguard.evidence import TrainingIndex

from . import live
from .calibration_choice import accept_saved_value, model_key
from .evidence_choice import cards, chosen_folder, folder_options, index_cache, to_uint8
from .plots import message_image

JUDGE, CALIBRATE = "judge these images", "set the copy threshold (these are ordinary generations)"


class MemoGuardCopyEvidence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardCopyEvidence",
            display_name="Copy Evidence (nearest training image)",
            category="MemoGuard",
            description="Finds, for each image, the nearest image of a training folder (a LoRA's or fine-tune's "
                        "dataset, with kohya-style .txt captions) and shows them side by side with the caption, the "
                        "similarity and a copy verdict. The folder is indexed once (thumbnails and perceptual hashes, "
                        "no download; cached in models/memoguard/indexes, indexed again when its files change).",
            inputs=[
                io.Image.Input("images", tooltip="The generations to judge (or, in threshold mode, ordinary ones)."),
                io.Combo.Input("training_images", options=folder_options(),
                               tooltip="A dataset folder inside models/memoguard_training (images, .txt captions "
                                       "beside them, subfolders included). Put one there and refresh to see it."),
                io.Combo.Input("mode", options=[JUDGE, CALIBRATE], default=JUDGE,
                               tooltip="judge: each image's nearest training image and verdict. Set the copy "
                                       "threshold: the images are at least 100 ordinary generations of this model "
                                       "(prompts that are not the dataset's captions); the threshold flags 1% of "
                                       "them and is stored for these weights and this folder."),
                io.Model.Input("model", optional=True,
                               tooltip="The model that made the images: its copy threshold gives the verdict (set "
                                       "it with mode 'set the copy threshold', or `memoguard index DIR --calibrate`)."),
            ],
            outputs=[
                io.Image.Output(display_name="cards", tooltip="Each generation beside its nearest training image."),
                io.String.Output(display_name="json", tooltip="The matches (file, caption, similarity, ratio, pHash "
                                                              "distance, threshold, copy) as JSON."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, training_images) -> bool:
        return accept_saved_value(training_images)

    @classmethod
    def execute(cls, images, training_images, mode=JUDGE, model=None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        try:
            folder = chosen_folder(training_images)
            bar = comfy.utils.ProgressBar(1)
            index = TrainingIndex.open(folder, index_cache(), progress=lambda done, total: bar.update_absolute(
                done, total), should_stop=comfy.model_management.processing_interrupted)
            key = model_key(model.model) if model is not None else None
            pixels = to_uint8(images)
            if mode == CALIBRATE:
                if key is None:
                    raise ValueError("setting the copy threshold needs the model input (the threshold is stored for "
                                     "its weights)")
                threshold = index.calibrate_copies(key, pixels, note="ComfyUI")
                index.save_to(index_cache())
                text = (f"copy threshold for these weights and {folder.name}: ratio <= {threshold:.3f} (1% of "
                        f"{len(pixels)} ordinary generations)")
            matches = index.nearest(pixels, key)
        except InterruptedError:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        except (ValueError, OSError) as e:  # memoguard.evidence.IndexError_ too: said on the node, the rest runs
            problem = f"Copy Evidence: {e}"
            live.show_text(f"MemoGuard: {problem}", cls.hidden.unique_id)
            data = json.dumps({"error": problem})
            return io.NodeOutput(message_image(problem), data,
                                 ui={**ui.PreviewImage(message_image(problem), cls=cls).as_dict(),
                                     "memoguard_evidence": [data]})
        if mode != CALIBRATE:
            copies = sum(bool(m.copy) for m in matches)
            text = (f"{len(matches)} image(s): {copies} copy a training image of {folder.name}"
                    if key is not None and matches[0].threshold is not None else
                    f"{len(matches)} image(s), nearest training images of {folder.name}; no copy verdict: "
                    + ("connect the model" if key is None else "no copy threshold for these weights and this folder "
                                                               "(mode 'set the copy threshold')"))
        live.show_text(f"MemoGuard: {text}", cls.hidden.unique_id)
        shown = cards(index, pixels, matches)
        data = json.dumps({"folder": folder.name, "summary": text, "matches": [m.to_dict() for m in matches]})
        return io.NodeOutput(shown, data, ui={**ui.PreviewImage(shown, cls=cls).as_dict(), "memoguard_evidence": [data]})
