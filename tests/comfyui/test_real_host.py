"""The node pack inside a real ComfyUI server (skipped unless COMFYUI_DIR points to a ComfyUI checkout).

Starts `main.py --cpu` on loopback with this repository as a custom node (through an
--extra-model-paths-config yaml), checks that the example workflows are listed and served as
workflow templates, derives each one's API prompt from its graph with the server's /object_info,
queues it over the HTTP API and reads the websocket events, the node outputs and the saved latents.
COMFYUI_PYTHON names the interpreter of ComfyUI's environment (default: this one); that
environment needs websocket-client.
"""
import copy
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from . import harness
from .workflow_format import api_prompt, load, widget_inputs

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
ROOT = Path(__file__).resolve().parents[2]
PACK = "memoguard"  # the folder name ComfyUI sees, and so the template group
MODELS = Path(os.environ.get("MEMOGUARD_TEST_CHECKPOINTS", "/work/hosts/models"))  # random-sd15*.safetensors
# screenshots and timings, outside the checkout (a test never writes into the repository)
ARTIFACTS = Path(os.environ.get("MEMOGUARD_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "memoguard-test-artifacts"))
BUNDLED_KEY = "unet-681368e6af6f82b5"  # memoguard/assets/calibration.json, measured on the diffusers model
TEMPLATES = ("memoguard_detect", "memoguard_mitigate", "memoguard_explain", "memoguard_copy_evidence")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, url: str):
        self.url, self.id = url, uuid.uuid4().hex

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=120) as r:
            return json.loads(r.read())

    @functools.cached_property
    def definitions(self) -> dict:
        return self.get("/object_info")

    def run(self, prompt: dict, timeout: float = 600):
        """Queue `prompt`; return (websocket messages of this prompt, history entry)."""
        import websocket
        ws = websocket.create_connection(self.url.replace("http", "ws") + f"/ws?clientId={self.id}", timeout=timeout)
        try:
            body = json.dumps({"prompt": prompt, "client_id": self.id}).encode()
            request = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
            events, deadline = [], time.time() + timeout
            while time.time() < deadline:
                message = ws.recv()
                if not isinstance(message, str):
                    continue  # binary previews
                event = json.loads(message)
                events.append(event)
                data = event.get("data", {})
                if event["type"] in ("execution_success", "execution_error") and data.get("prompt_id") == prompt_id:
                    break
            for _ in range(100):  # the history entry lands just after the last event
                history = self.get(f"/history/{prompt_id}")
                if prompt_id in history:
                    return events, history[prompt_id]
                time.sleep(0.1)
            raise TimeoutError(f"no history for prompt {prompt_id}; events: {[e['type'] for e in events]}")
        finally:
            ws.close()


def queue_all(client: Client, prompts: list, timeout: float = 1800) -> list:
    """Queue every prompt at once (ComfyUI runs them one after another, patched models cached between them);
    return each one's history entry, in order."""
    ids = []
    for prompt in prompts:
        body = json.dumps({"prompt": prompt, "client_id": client.id}).encode()
        request = urllib.request.Request(client.url + "/prompt", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            ids.append(json.loads(r.read())["prompt_id"])
    deadline, done = time.time() + timeout, {}
    while len(done) < len(ids):
        assert time.time() < deadline, f"{len(done)} of {len(ids)} prompts finished"
        for prompt_id in ids:
            if prompt_id not in done:
                entry = client.get(f"/history/{prompt_id}").get(prompt_id)
                if entry is not None and entry.get("status", {}).get("completed") is not None:
                    done[prompt_id] = entry
        time.sleep(0.5)
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy")
    (work / "packs").mkdir()
    (work / "packs" / PACK).symlink_to(ROOT)
    (work / "extra.yaml").write_text(f"memoguard:\n  custom_nodes: {work / 'packs'}\n  checkpoints: {MODELS}\n"
                                     f"  memoguard: {work / 'calibrations'}\n"
                                     f"  memoguard_training: {work / 'training'}\n")
    from memoguard.tiny.evalsets import eval_set
    eval_set("shapes").write_training_folder(work / "training" / "tiny-shapes")  # the copy evidence template's
    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log = open(work / "server.log", "w")
    server = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--extra-model-paths-config", str(work / "extra.yaml"), "--disable-auto-launch",
                               "--output-directory", str(work / "output")],
                              cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        for _ in range(600):
            try:
                client.get("/object_info/MemoGuardMemorizationMonitor")
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"ComfyUI exited: {(work / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        client.work = work
        yield client, work / "output"
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def workflow(client: Client, name: str, steps: int = 8) -> dict:
    """An example workflow's API prompt with fewer steps (CPU time); everything else as shipped."""
    prompt = api_prompt(load(f"memoguard_{name}"), client.definitions)
    for node in prompt.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def of_type(events, kind):
    return [e["data"] for e in events if e["type"] == kind]


def saved_latent(output: Path, prefix: str):
    import safetensors.torch
    return safetensors.torch.load_file(str(sorted(output.glob(f"{prefix}*.latent"))[-1]))["latent_tensor"]


def with_latent_saved(prompt: dict, prefix: str) -> dict:
    prompt = copy.deepcopy(prompt)
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}}
    return prompt


def assert_latent_is_the_unmonitored_one(client, output, watched: dict) -> None:
    """`watched` (with_latent_saved, already run) again without the Monitor (2) and Score (9): the same latent."""
    prefix = watched["90"]["inputs"]["filename_prefix"]
    plain = {k: copy.deepcopy(v) for k, v in watched.items() if k not in ("2", "9")}
    plain["6"]["inputs"]["model"] = ["1", 0]
    plain["90"]["inputs"]["filename_prefix"] = f"unmonitored_{prefix}"  # a prefix the watched one's glob misses
    events, _ = client.run(plain)
    assert not of_type(events, "execution_error")
    assert saved_latent(output, prefix).equal(saved_latent(output, f"unmonitored_{prefix}"))


def test_node_pack_registers_every_node_with_tooltips(comfy):
    client, _ = comfy
    for node in ("MemoGuardMemorizationMonitor", "MemoGuardMemorizationScore", "MemoGuardEmbeddingMinimization",
                 "MemoGuardTokenContributions", "MemoGuardTinyModelLoader", "MemoGuardCalibrate", "MemoGuardTextEncode",
                 "MemoGuardCopyEvidence"):
        info = client.get(f"/object_info/{node}")[node]
        assert info["category"] == "MemoGuard"
        for name, spec in {**info["input"]["required"], **info["input"].get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_example_workflows_are_listed_and_served_as_templates(comfy):
    client, _ = comfy
    assert sorted(client.get("/workflow_templates")[PACK]) == sorted(TEMPLATES)
    for name in TEMPLATES:
        served = client.get(f"/api/workflow_templates/{PACK}/{name}.json")
        assert served == load(name) and {"nodes", "links", "version"} <= set(served)


def test_ci_node_definitions_match_the_server(comfy):
    """The harness's stand-ins (pack schemas without ComfyUI, core node table) read like /object_info."""
    client, _ = comfy
    mirrored = harness.node_definitions()
    for node_type in {n["type"] for name in TEMPLATES for n in load(name)["nodes"]}:
        real = client.definitions[node_type]
        assert widget_inputs(mirrored[node_type]) == widget_inputs(real), node_type
        if "output" in mirrored[node_type]:
            assert mirrored[node_type]["output"] == real["output"], node_type


def test_detect_streams_each_step_and_leaves_the_latent_bit_identical(comfy):
    client, output = comfy
    watched = with_latent_saved(workflow(client, "detect"), "watched")
    events, history = client.run(watched)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    steps = [d for d in of_type(events, "memoguard.step") if d["node"] == "2"]
    assert steps and [d["step"] for d in steps] == list(range(steps[0]["total"]))
    assert of_type(events, "memoguard.verdict")
    trace = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
    assert len(trace["trace"]["rms"][0]) == len(steps) and trace["trace"]["rms"][0][0] == pytest.approx(steps[0]["score"][0])

    assert_latent_is_the_unmonitored_one(client, output, watched)


def test_cfg1_scores_the_first_step_with_the_negative_pass_the_monitor_runs(comfy):
    """At cfg 1 ComfyUI skips the negative prompt's pass: the Monitor runs it for step 1 only, its score equals the one
    ComfyUI's own pass gives (force_uncond_at_cfg1), and the latent is the unmonitored one."""
    client, output = comfy
    watched = with_latent_saved(workflow(client, "detect"), "cfg1_watched")
    watched["6"]["inputs"]["cfg"] = 1.0
    events, history = client.run(watched)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    steps = [d for d in of_type(events, "memoguard.step") if d["node"] == "2"]
    trace = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
    print("cfg 1:", trace["summary"], trace["notes"])
    assert [d["step"] for d in steps] == [0] and trace["label"] != "unavailable"
    assert any("1 extra model call" in note for note in trace["notes"])
    forced = workflow(client, "detect")
    forced["6"]["inputs"]["cfg"] = 1.0
    forced["2"]["inputs"]["force_uncond_at_cfg1"] = True
    events, _ = client.run(forced)
    reference = [d for d in of_type(events, "memoguard.step") if d["node"] == "2" and d["step"] == 0][0]["score"][0]
    assert steps[0]["score"][0] == pytest.approx(reference, rel=1e-4)
    assert_latent_is_the_unmonitored_one(client, output, watched)


def test_memorized_prompt_scores_above_an_ordinary_one(comfy):
    client, _ = comfy
    scores = {}
    for text in ("a purple ring, lighthouse poster", "a white cross in the center"):
        prompt = workflow(client, "detect")
        prompt["3"]["inputs"]["text"] = text
        events, _ = client.run(prompt)
        scores[text] = [d for d in of_type(events, "memoguard.step") if d["step"] == 0][0]["score"][0]
    memorized, ordinary = scores.values()
    assert memorized > ordinary


def test_mitigate_template_masks_the_padding_and_every_strategy_runs_in_the_sampler(comfy):
    """The template's positive prompt comes from MemoGuard Text Encode: 'auto' masks its padding. The other
    strategies on the same node: token removal (the prompt re-encoded through ComfyUI's CLIP), opposite guidance
    (the first step's score read from the sampler's own predictions), the paper's minimization."""
    client, _ = comfy

    def run(strategy=None):
        prompt = workflow(client, "mitigate")
        if strategy is not None:
            (node,) = [k for k, v in prompt.items() if v["class_type"] == "MemoGuardEmbeddingMinimization"]
            prompt[node]["inputs"]["strategy"] = strategy
        events, history = client.run(prompt)
        assert not of_type(events, "execution_error"), of_type(events, "execution_error")
        (record,) = of_type(events, "memoguard.mitigation")
        first = [d for d in of_type(events, "memoguard.step") if d["step"] == 0][0]["score"][0]
        return record, first, history["outputs"]["9"]["text"][0]

    record, first, text = run()
    assert record["strategy"] == "mask_padding" and record["ran"] and record["masked"][0] > 60
    assert record["after"][0] < record["before"][0] and first == pytest.approx(record["after"][0], rel=1e-4)
    assert "padding masked" in text and "padding masked" in record["summary"]
    record, first, text = run("remove_tokens")
    assert record["strategy"] == "remove_tokens" and record["ran"] and record["removed"][0]
    assert first == pytest.approx(record["after"][0], rel=1e-4) and "token removal: removed" in text
    record, first, text = run("opposite_guidance")
    assert record["strategy"] == "opposite_guidance" and record["ran"] and record["early_scale"] == -3.0
    assert first == pytest.approx(record["before"][0], rel=1e-4) and "away from the prompt" in text
    record, first, text = run("minimize")
    assert record["strategy"] == "minimize" and record["ran"] and 1 <= record["iterations"] <= 10
    assert record["after"][0] < record["before"][0] and first == pytest.approx(record["after"][0], rel=1e-3)
    assert "iterations" in text


def test_explain_shows_token_shares(comfy):
    client, _ = comfy
    events, history = client.run(workflow(client, "explain"))
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    data = json.loads(history["outputs"]["10"]["memoguard_tokens"][0])
    assert data["tokens"] == ["a", "purple", "ring", ",", "lighthouse", "poster"]
    assert sum(data["shares"]) == pytest.approx(1.0) and data["method_name"] == "leave-one-out"
    # the tiny model's bundled calibration sets the summary's threshold; each word's score without it is measured
    assert data["threshold"] > 0 and len(data["score_without"]) == 6 and None not in data["score_without"]
    assert data["summary"].startswith(("top words (leave-one-out): ", "spread over the caption"))
    assert history["outputs"]["10"]["images"]


def test_long_prompts_are_explained_on_the_screened_words(comfy):
    """Over 12 words auto measures the 12 words a first-order estimate ranks first (a backward pass through
    ComfyUI's model, the prompt re-encoded by its CLIP without each word)."""
    client, _ = comfy
    text = "a red house on a green hill under a blue sky with white clouds and a small yellow dog"
    prompt = workflow(client, "explain")
    prompt["10"]["inputs"]["text"] = text
    events, history = client.run(prompt)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    data = json.loads(history["outputs"]["10"]["memoguard_tokens"][0])
    assert data["tokens"] == text.split() and data["method"] == "leave_one_out_screened"
    assert data["method_name"] == "leave-one-out of the likeliest words"
    measured = [i for i, s in enumerate(data["score_without"]) if s is not None]
    assert len(measured) == 12 and all(data["scores"][i] == 0.0 for i in range(len(text.split())) if i not in measured)
    assert data["summary"].startswith(("top words (leave-one-out of the likeliest words): ", "spread over the caption"))


def default_inputs(definition: dict) -> dict:
    """A node's required inputs at their defaults (a combo without one: its first option), from /object_info."""
    out = {}
    for name, spec in definition["input"]["required"].items():
        options = spec[1] if len(spec) > 1 else {}
        if "default" in options:
            out[name] = options["default"]
        elif isinstance(spec[0], list) and spec[0]:
            out[name] = spec[0][0]
        elif options.get("options"):
            out[name] = options["options"][0]
    return out


def test_training_filter_runs_inside_comfyuis_own_train_lora(comfy):
    """MemoGuard Training Filter -> ComfyUI's Train LoRA -> the Report, through the server (which runs nodes under
    inference mode, Train LoRA with gradients): the filter judges every training step's sample."""
    client, _ = comfy
    loader = workflow(client, "explain")["1"]
    train = {**default_inputs(client.definitions["TrainLoraNode"]), "model": ["20", 0], "latents": ["5", 0],
             "positive": ["3", 0], "steps": 30, "batch_size": 1, "training_dtype": "fp32", "lora_dtype": "fp32",
             "gradient_checkpointing": False}
    prompt = {
        "1": loader,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a purple ring, lighthouse poster", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 4, "color": 0x6040a0}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},  # the dataset's latents
        "20": {"class_type": "MemoGuardTrainingFilter",
               "inputs": {**default_inputs(client.definitions["MemoGuardTrainingFilter"]), "model": ["1", 0],
                          "clip": ["1", 1], "latents": ["5", 0], "positive": ["3", 0], "reference_samples": 160}},
        "21": {"class_type": "TrainLoraNode", "inputs": train},
        "22": {"class_type": "MemoGuardTrainingFilterReport", "inputs": {"model": ["20", 0], "trained": ["21", 0]}},
    }
    events, history = client.run(prompt)
    assert not of_type(events, "execution_error"), [e.get("exception_message") for e in of_type(events, "execution_error")]
    text = history["outputs"]["22"]["memoguard_filter_report"][0]
    print(text)
    assert text.startswith("30 training steps: ") and "samples dropped" in text, text


def test_stop_action_ends_the_queue_item_with_a_message(comfy):
    client, _ = comfy
    prompt = workflow(client, "detect")
    prompt["2"]["inputs"].update(threshold=1e-6, action="stop")
    events, _ = client.run(prompt)
    (error,) = of_type(events, "execution_error")
    assert "MemoGuard stopped this generation" in error["exception_message"]


@pytest.mark.parametrize("name, selector", [("detect", ".memoguard-summary"), ("mitigate", ".memoguard-summary"),
                                            ("explain", ".memoguard-token"), ("copy_evidence", ".memoguard-evidence")])
def test_browser_opens_the_template_as_a_graph_and_shows_the_results(comfy, name, selector):
    """ComfyUI's own front end in Chromium (playwright-core via NODE_PATH; CHROMIUM, default /usr/bin/chromium)."""
    import shutil
    if not shutil.which("node") or not os.environ.get("NODE_PATH") or not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        pytest.skip("needs node, NODE_PATH with playwright-core and Chromium")
    client, _ = comfy
    artifacts = ARTIFACTS
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / f"comfyui_{name}.png"
    run = subprocess.run(["node", str(Path(__file__).with_name("browser_check.mjs")), client.url, PACK,
                          f"memoguard_{name}", selector, str(shot), "6"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert f"memoguard_{name}" in result["listed"] and result["missing"] == []
    # what the front end queues from the graph is what the tests derive from it
    queued = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()}
    assert queued == api_prompt(load(f"memoguard_{name}"), client.definitions)
    state = {node["type"]: node for node in result["state"]}
    if name == "explain":
        assert state["MemoGuardTokenContributions"]["tokens"]["tokens"] == ["a", "purple", "ring", ",", "lighthouse", "poster"]
        assert "lighthouse" in result["text"] and "%" in result["text"]
    elif name == "copy_evidence":
        evidence = state["MemoGuardCopyEvidence"]["evidence"]
        assert len(evidence["matches"]) == 4 and "image 1:" in result["text"] and "similarity" in result["text"]
    else:
        chart = state["MemoGuardMemorizationMonitor"]["memoguard"]
        assert len(chart["steps"]) == chart["total"] and len(chart["scores"]) == chart["total"]
        assert "score" in result["text"]
    if name == "mitigate":
        mitigation = state["MemoGuardEmbeddingMinimization"]["mitigation"]
        assert mitigation["ran"] and mitigation["strategy"] == "mask_padding"
        assert any("padding masked" in panel for panel in result["panels"])
    assert shot.stat().st_size > 10000


def test_copy_evidence_names_the_training_image_a_copy_reproduces_and_judges_by_the_models_threshold(comfy):
    """The template on the tiny model: each generated image's nearest training image is the one the ground-truth judge
    names for the images that copy; a threshold set from 100 ordinary generations is stored under the weights' key
    (the CLI's key of the bundled model) and gives every image a verdict."""
    import numpy as np
    from PIL import Image
    from memoguard.evidence import TrainingIndex, cache_file
    from memoguard.tiny.evalsets import eval_set
    client, output = comfy
    prompt = workflow(client, "copy_evidence", steps=20)
    events, history = client.run(prompt)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    data = json.loads(history["outputs"]["10"]["memoguard_evidence"][0])
    assert len(data["matches"]) == 4 and history["outputs"]["10"]["images"]
    files = sorted(output.glob("memoguard_copy_evidence_*.png"))[-4:]
    images = np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])
    shapes = eval_set("shapes")
    source, _, ratio = __import__("memoguard.tiny.judge", fromlist=["x"]).nearest_training(images, shapes.train_images)
    copies = ratio < shapes.copy_ratio
    print("copy evidence:", data["summary"], "judge copies:", copies.tolist())
    assert copies.any()
    for match, is_copy, src in zip(data["matches"], copies, source):
        if is_copy:
            assert match["file"] == f"{src:05d}.png"
    ordinary = copy.deepcopy(prompt)
    ordinary["3"]["inputs"]["text"] = "a white cross in the center"
    ordinary["5"]["inputs"]["batch_size"] = 100
    ordinary["10"]["inputs"]["mode"] = "set the copy threshold (these are ordinary generations)"
    events, history = client.run(ordinary)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    assert json.loads(history["outputs"]["10"]["memoguard_evidence"][0])["summary"].startswith("copy threshold")
    index = TrainingIndex.load(cache_file(client.work / "training" / "tiny-shapes", client.work / "calibrations" / "indexes"))
    assert list(index.copy_thresholds) == [BUNDLED_KEY]
    prompt["6"]["inputs"]["seed"] = 1  # new images: the node runs again (ComfyUI caches unchanged ones)
    events, history = client.run(prompt)
    judged = json.loads(history["outputs"]["10"]["memoguard_evidence"][0])
    assert all(m["copy"] == (m["ratio"] <= m["threshold"]) for m in judged["matches"])
    assert "copy a training image of tiny-shapes" in judged["summary"]


def test_sdxl_token_contributions_and_mitigation_in_the_real_host():
    """tests/comfyui/real_host_sdxl.py in ComfyUI's Python: ComfyUI's own SDXL class, tiny and random."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(Path(__file__).with_name("real_host_sdxl.py"))], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["model"] == "SDXL" and out["y_shape"] == [1, 64 + 6 * 256]
    # the adapter builds y as the sampler does: the same first-step score
    assert out["adapter_first_step"] == pytest.approx(out["sampler_first_step"], rel=1e-5)
    assert out["tokens"]["tokens"] == ["a", "purple", "ring", ",", "lighthouse", "poster"]
    # the node's default re-encodes the prompt without each word; gradient x input stays selectable
    assert out["tokens"]["method"] == "leave_one_out" and None not in out["tokens"]["score_without"]
    assert sum(out["tokens_gradient"]["shares"]) == pytest.approx(1.0) and min(out["tokens_gradient"]["scores"]) > 0
    # a word left out keeps the weights of the others: the same conditioning as the prompt typed without it
    reencode = out["reencode"]
    assert reencode["words"] == ["a", "purple", "ring", ",", "lighthouse", "poster"]
    assert reencode["edited_vs_typed"] < 1e-5 < reencode["weight_effect"]
    # past a 77-token chunk too: the words after a left-out one move up a chunk as ComfyUI chunks the prompt typed
    # without it (a weighted group kept whole included), and one that loses a chunk samples as the shorter prompt
    long = out["long"]
    assert long["tokens"] == [86] and long["length"] == 154 and long["group_moved"]
    assert long["edited_vs_typed"] < 1e-5 and long["y_vs_typed"] < 1e-5 and long["padded"] is None
    assert long["lost_length"] == [154, 77] and long["lost_padded"] is None
    assert long["lost_eps_vs_typed"] < 1e-4 * long["eps_scale"]
    mitigation = out["mitigation"]
    assert mitigation["error"] is None and mitigation["ran"] and mitigation["after"][0] < mitigation["before"][0]
    assert mitigation["sampler_first_step"] == pytest.approx(mitigation["after"], rel=1e-4)
    oom = out["out_of_memory"]
    assert oom["plain_image"] and "ran out of memory" in oom["error"] and "ran out of memory" in oom["tokens"]["error"]


def test_flow_families_are_scored_calibrated_explained_and_mitigated_in_the_real_host():
    """tests/comfyui/real_host_flow.py in ComfyUI's Python: SD3, Flux dev and schnell, Chroma, Qwen-Image (and, where
    the host has them, Flux.2 and Z-Image) as ComfyUI's own classes, tiny and random."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(Path(__file__).with_name("real_host_flow.py"))], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    present = {name: row for name, row in out.items() if "absent" not in row}
    assert {"sd3", "flux", "flux_schnell", "chroma", "qwen_image", "sd3_own_encoders", "flux_own_encoders"} <= set(present)
    for name, row in present.items():
        assert row["prompt_changes_image"] > 1e-3 and row["bit_identical"], name
        # flow samplers start at sigma 1: the score reads the velocity there (the noise difference is 0)
        assert row["first_sigma"] == 1.0 and min(row["first_step"]) > 1e-5, name
        assert row["calibration"]["prediction"] == "flow" and row["calibration"]["noise_level"] == 1.0, name
        verdict = row["verdict"]
        assert verdict["label"] in ("ok", "flagged") and verdict["notes"] == [], name
        assert verdict["threshold"] == pytest.approx(verdict["calibrated_threshold"]), name
        # the verdict's run (seed 0, a calibration prompt) is one of the calibration's own samples
        assert min(abs(s - verdict["score"]) for s in row["calibration_scores"]) < 1e-5 * max(1.0, verdict["score"])
        assert row.get("other_models_calibration", "uncalibrated") == "uncalibrated", name
        if name == "flux2_klein":  # its conditioning is padded to 512 positions: words are not mapped, and it says so
            assert "512 positions" in row["tokens"]["error"] and "512 positions" in row["mitigation"]["error"]
            assert not row["mitigation"]["ran"]
            continue
        assert row["tokens"]["tokens"] == ["a", "purple", "ring", ",", "lighthouse", "poster"], name
        assert row["tokens"]["method"] == "leave_one_out" and None not in row["tokens"]["score_without"], name
        mitigation = row["mitigation"]
        assert mitigation["error"] is None and mitigation["ran"] and mitigation["removed"][0], name
        assert mitigation["after"][0] < mitigation["before"][0], name
        assert mitigation["sampler_first_step"] == pytest.approx(mitigation["after"], rel=1e-4), name
    # with the families' own tokenizers (SD3: CLIP-L/G positions then T5's; Flux: T5's, CLIP-L pooled) a word is
    # its pieces in every stream, and leaving it out is exactly the prompt typed without it, pooled text included
    for name, length in (("sd3_own_encoders", 154), ("flux_own_encoders", 256)):
        reencode = present[name]["reencode"]
        assert reencode["words"] == ["a", "purple", "ring", ",", "lighthouse", "poster"] and reencode["length"] == length
        assert min(reencode["positions"]) >= (2 if name.startswith("sd3") else 1)
        assert reencode["edited_vs_typed"] < 1e-5 and reencode["pooled_vs_typed"] < 1e-5 < reencode["effect"]
    # padding masking's premise is CLIP's padding: SD3 masks its CLIP chunk's (T5's positions untouched); Flux's T5
    # alone has none, and "auto" removes words there, and says so
    sd3, flux = present["sd3_own_encoders"]["auto_strategy"], present["flux_own_encoders"]["auto_strategy"]
    assert sd3["strategy"] == "mask_padding" and sd3["notes"] == [] and sd3["error"] is None
    assert sd3["masked"] == [present["sd3_own_encoders"]["reencode"]["clip_padding"]] and sd3["masked"][0] > 0
    assert present["flux_own_encoders"]["reencode"]["clip_padding"] is None
    assert flux["strategy"] == "remove_tokens" and any("padding masking needs" in n for n in flux["notes"])
    assert present["sd3"]["auto_strategy"]["strategy"] == "mask_padding"  # fed by a CLIP alone
    # Flux dev's embedded guidance: recorded by the calibration, a run at another one says so
    assert present["flux"]["calibration"]["embedded_guidance"] == 3.5
    assert present["sd3"]["calibration"]["embedded_guidance"] is None
    assert any("embedded guidance 3.5" in n and "uses 2" in n for n in present["flux"]["guidance_2_notes"])
    cfg1 = present["flux_schnell"]["cfg1"]  # guidance-distilled at cfg 1: MemoGuard's own negative pass, image kept
    assert cfg1["bit_identical"] and cfg1["first_step"] == pytest.approx(present["flux_schnell"]["first_step"], rel=1e-4)
    assert any("1 extra model call" in note for note in cfg1["notes"])


def _version(client) -> str:
    return client.get("/system_stats")["system"].get("comfyui_version", "?")


def test_detect_samples_the_tiny_model_at_16x16_with_its_bundled_calibration(comfy):
    """ComfyUI 0.33 resizes empty latents by the latent format's ratio; the workflows must still run at 16x16."""
    client, output = comfy
    prompt = with_latent_saved(api_prompt(load("memoguard_detect"), client.definitions), "detect16")
    started = time.time()
    events, history = client.run(prompt)
    seconds = time.time() - started
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    latent = saved_latent(output, "detect16")
    assert tuple(latent.shape) == (1, 3, 16, 16)
    trace = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
    assert trace["model_key"] == BUNDLED_KEY  # the tiny loader's UNet has the diffusers model's key
    assert "bundled with MemoGuard" in trace["calibration"] and trace["notes"] == []
    assert trace["verdicts"][0]["label"] == "flagged" and trace["label"] == "flagged"
    steps = [d for d in of_type(events, "memoguard.step") if d["node"] == "2"]
    assert len(steps) == 20 and all(d["band"] is not None for d in steps[:-1]) and steps[0]["threshold"]
    artifacts = ARTIFACTS
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / f"comfyui_detect16_{_version(client)}.json").write_text(json.dumps({
        "version": _version(client), "seconds": seconds, "first_step": steps[0]["score"][0],
        "threshold": steps[0]["threshold"], "latent_sum": float(latent.double().sum()),
        "latent_abs_sum": float(latent.double().abs().sum())}))


CALIBRATION_PROMPTS = "\n".join([f"a photo of a {c} {t}" for c in ("red", "blue", "green", "small")
                                  for t in ("house", "car", "tree")][:11]
                                 + [", ".join(["a small green tree beside a red house"] * 12)])  # two chunks


def sd15_prompt(checkpoint: str, calibrate: bool, seed: int = 0) -> dict:
    """Checkpoint -> Calibrate only, or -> Monitor 'auto' -> KSampler 64x64 pixels, 4 steps -> Score."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a blue house", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "MemoGuardMemorizationMonitor", "inputs": {
            "model": ["1", 0], "window": 1, "calibration": "auto", "calibration_file": "", "false_positive_rate": 0.01,
            "threshold": 0.0, "action": "warn", "force_uncond_at_cfg1": False}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": 4, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "MemoGuardMemorizationScore", "inputs": {"model": ["2", 0], "samples": ["6", 0]}},
    }
    if calibrate:
        prompt = {k: prompt[k] for k in ("1", "5")}
        prompt["20"] = {"class_type": "MemoGuardCalibrate", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "latent": ["5", 0], "steps": 4, "scheduler": "normal", "cfg": 7.5,
            "prompts": CALIBRATION_PROMPTS, "band_prompts": 2, "seed": 0, "batch_size": 4}}
    return prompt


@pytest.mark.skipif(not (MODELS / "random-sd15.safetensors").exists() or not (MODELS / "random-sd15-b.safetensors").exists(),
                    reason="needs tests/hosts/make_random_checkpoint.py checkpoints")
def test_calibrate_node_on_a_checkpoint_then_auto_uses_it_and_only_for_that_checkpoint(comfy):
    client, _ = comfy
    started = time.time()
    events, history = client.run(sd15_prompt("random-sd15.safetensors", calibrate=True), timeout=1800)
    calibrate_seconds = time.time() - started
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    summary = history["outputs"]["20"]["text"][0]
    saved = sorted((client.work / "calibrations").glob("unet-*.json"))
    assert len(saved) == 1 and str(saved[0]) in summary and "12 benign prompts" in summary
    key = saved[0].stem
    events, history = client.run(sd15_prompt("random-sd15.safetensors", calibrate=False), timeout=1800)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    trace = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
    stored = json.loads(saved[0].read_text())["models"][key]
    assert trace["model_key"] == key and str(saved[0]) in trace["calibration"]
    assert trace["verdicts"][0]["label"] in ("ok", "flagged") and trace["notes"] == []
    assert stored["conditions"]["host"] == "comfyui" and stored["conditions"]["latent"] == [4, 8, 8]
    step0 = [d for d in of_type(events, "memoguard.step") if d["step"] == 0][0]
    assert step0["band"] is not None and step0["threshold"] == pytest.approx(trace["threshold"])

    events, history = client.run(sd15_prompt("random-sd15-b.safetensors", calibrate=False, seed=1), timeout=1800)
    assert not of_type(events, "execution_error"), of_type(events, "execution_error")
    trace_b = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
    assert trace_b["model_key"] != key
    assert trace_b["verdicts"][0]["label"] == "uncalibrated" and trace_b["threshold"] is None
    assert "no calibration for this model" in trace_b["summary"] and "MemoGuard Calibrate" in trace_b["summary"]
    artifacts = ARTIFACTS
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / f"comfyui_calibrate_sd15_{_version(client)}.json").write_text(json.dumps({
        "version": _version(client), "calibrate_prompt_seconds": calibrate_seconds, "summary": summary,
        "verdict_a": trace["summary"], "verdict_b": trace_b["summary"], "key_a": key, "key_b": trace_b["model_key"]}))


def test_calibration_files_come_from_the_list_and_saved_paths_still_queue(comfy):
    """calibration_file lists models/memoguard; a workflow saved with a path (the old free-text input) passes
    ComfyUI's validation and the verdict says what to do, the same for a file that exists and one that does not;
    a file copied into the folder appears in the list and is used. The tiny loader refuses a path on the node."""
    client, _ = comfy
    bundled = ROOT / "memoguard" / "assets" / "calibration.json"
    summaries = []
    for path in (str(bundled), "/etc/nonexistent.json"):
        prompt = workflow(client, "detect", steps=2)
        prompt["2"]["inputs"].update(calibration="file", calibration_file=path)
        events, history = client.run(prompt)
        assert not of_type(events, "execution_error"), of_type(events, "execution_error")
        trace = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
        assert trace["label"] == "uncalibrated" and "is not one of the calibrations in" in trace["calibration"]
        summaries.append(trace["calibration"].replace(repr(path), "X"))
    assert summaries[0] == summaries[1]
    folder = client.work / "calibrations"
    folder.mkdir(exist_ok=True)
    (folder / "copied.json").write_bytes(bundled.read_bytes())
    options = client.get("/object_info/MemoGuardMemorizationMonitor")["MemoGuardMemorizationMonitor"]["input"][
        "required"]["calibration_file"]
    assert "copied.json" in json.dumps(options)
    prompt = workflow(client, "detect", steps=2)
    prompt["2"]["inputs"].update(calibration="file", calibration_file="copied.json")
    events, history = client.run(prompt)
    trace = json.loads(history["outputs"]["9"]["memoguard_trace"][0])
    assert trace["label"] in ("ok", "flagged") and "copied.json" in trace["calibration"]
    prompt = workflow(client, "detect", steps=2)
    prompt["1"]["inputs"]["folder"] = str(ROOT / "memoguard" / "assets" / "tiny-sd")
    events, _ = client.run(prompt)
    (error,) = of_type(events, "execution_error")
    assert "is not one of the tiny models in models/memoguard" in error["exception_message"]


@pytest.mark.skipif(not (MODELS / "random-sd15.safetensors").exists(), reason="needs tests/hosts/make_random_checkpoint.py checkpoints")
def test_twenty_queued_prompts_of_mixed_models_and_settings_each_get_their_own_record(comfy):
    """Issue 18, load: 20 prompts queued at once, the tiny model and an SD1.5-size checkpoint, different prompts,
    seeds, windows, thresholds and calibration choices, some mitigated. Every prompt's record (score per step,
    verdict, model key, threshold) is the one the same prompt gets run alone, and nothing fails."""
    client, _ = comfy
    texts = ["a purple ring, lighthouse poster", "a red circle", "a small blue ring", "a green square at the top"]
    prompts = []
    for k in range(16):
        prompt = workflow(client, "mitigate" if k % 4 == 3 else "detect", steps=3 + k % 3)
        clip_text = next(n for n in prompt.values()
                         if n["class_type"] in ("CLIPTextEncode", "MemoGuardTextEncode") and n["inputs"]["text"])
        clip_text["inputs"]["text"] = texts[k % 4]
        monitor = next(n for n in prompt.values() if n["class_type"] == "MemoGuardMemorizationMonitor")
        monitor["inputs"].update(window=1 + k % 2, threshold=0.0 if k % 3 else 0.02,
                                 calibration="none" if k % 5 == 4 else "auto")
        next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]["seed"] = k
        prompts.append(prompt)
    prompts += [sd15_prompt("random-sd15.safetensors", calibrate=False, seed=s) for s in range(4)]
    together = queue_all(client, prompts)
    for k, (prompt, entry) in enumerate(zip(prompts, together)):
        assert entry["status"]["status_str"] == "success", (k, entry["status"])
    alone = [queue_all(client, [prompt])[0] for prompt in prompts]

    def record(entry):
        trace = json.loads(entry["outputs"]["9"]["memoguard_trace"][0])
        return trace["trace"]["rms"], trace["model_key"], trace["threshold"], [v["label"] for v in trace["verdicts"]]

    keys = set()
    for k, (a, b) in enumerate(zip(together, alone)):
        (rms_a, key_a, threshold_a, labels_a), (rms_b, key_b, threshold_b, labels_b) = record(a), record(b)
        assert key_a == key_b and labels_a == labels_b and threshold_a == threshold_b, k
        assert len(rms_a) == len(rms_b) and all(a == pytest.approx(b, rel=1e-5, abs=1e-7)
                                                for a, b in zip(rms_a, rms_b)), k  # per image, per step
        keys.add(key_a)
    named = keys - {None}  # calibration 'none' takes no key
    assert BUNDLED_KEY in named and len(named) == 2  # the tiny model and the checkpoint, each its own key
