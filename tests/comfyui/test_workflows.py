"""The example workflows: one file each, in ComfyUI's UI (graph) format, from which the API prompts derive."""
import pytest

from . import harness
from .workflow_format import WORKFLOWS, api_prompt, load, widget_inputs

NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def definitions():
    return harness.node_definitions()


def test_the_four_examples_are_there():
    assert NAMES == ["memoguard_copy_evidence", "memoguard_detect", "memoguard_explain", "memoguard_mitigate"]


def test_copy_evidence_judges_the_decoded_images_of_the_tiny_model_against_its_training_set(definitions):
    prompt = api_prompt(load("memoguard_copy_evidence"), definitions)
    (evidence,) = [v for v in prompt.values() if v["class_type"] == "MemoGuardCopyEvidence"]
    assert prompt[evidence["inputs"]["images"][0]]["class_type"] == "VAEDecode"
    assert prompt[evidence["inputs"]["model"][0]]["class_type"] == "MemoGuardTinyModelLoader"
    assert evidence["inputs"]["training_images"] == "tiny-shapes"  # what `memoguard index ... --write-evaluation-set`
    (text,) = [v for v in prompt.values() if v["class_type"] == "CLIPTextEncode" and v["inputs"]["text"]]
    assert text["inputs"]["text"] == "a purple ring, lighthouse poster"  # a memorized caption


@pytest.mark.parametrize("name", NAMES)
def test_graph_is_consistent_and_every_input_is_given(name, definitions):
    graph = load(name)
    nodes = {n["id"]: n for n in graph["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in graph["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind == nodes[target]["inputs"][target_slot]["type"]
    for node in graph["nodes"]:
        widgets = widget_inputs(definitions[node["type"]])
        assert len(node["widgets_values"]) == len(widgets) + sum(control for _, control in widgets), node["type"]
    prompt = api_prompt(graph, definitions)
    for node_id, node in prompt.items():
        assert set(definitions[node["class_type"]]["input"]["required"]) <= set(node["inputs"]), node_id


def chain(prompt, node_id, kind):
    """Class types upstream of `node_id` along its `kind` input (e.g. the model a sampler uses)."""
    out = []
    while kind in prompt[node_id]["inputs"]:
        node_id = prompt[node_id]["inputs"][kind][0]
        out.append(prompt[node_id]["class_type"])
        kind = "model"
    return out


def test_the_examples_wire_memoguard_as_documented(definitions):
    detect, mitigate, explain = (api_prompt(load(f"memoguard_{n}"), definitions) for n in ("detect", "mitigate", "explain"))
    sampler = lambda p: next(k for k, v in p.items() if v["class_type"] == "KSampler")
    assert chain(detect, sampler(detect), "model") == ["MemoGuardMemorizationMonitor", "MemoGuardTinyModelLoader"]
    assert chain(mitigate, sampler(mitigate), "model") == [
        "MemoGuardMemorizationMonitor", "MemoGuardEmbeddingMinimization", "MemoGuardTinyModelLoader"]
    (minimize,) = [v for v in mitigate.values() if v["class_type"] == "MemoGuardEmbeddingMinimization"]
    assert minimize["inputs"]["mode"] == "always"
    (tokens,) = [v for v in explain.values() if v["class_type"] == "MemoGuardTokenContributions"]
    assert tokens["inputs"]["text"] == "a purple ring, lighthouse poster"
    for prompt in (detect, mitigate):
        (latent,) = [v for v in prompt.values() if v["class_type"] == "EmptyLatentImage"]
        assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (128, 128)  # 16x16 pixels
        (ksampler,) = [v for v in prompt.values() if v["class_type"] == "KSampler"]
        assert ksampler["inputs"]["cfg"] == 3.0  # the bundled model's guidance: its benign band applies
        for node in prompt.values():
            if "calibration" in node["inputs"]:
                assert node["inputs"]["calibration"] == "auto"
