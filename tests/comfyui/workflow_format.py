"""The example workflows are stored once, in ComfyUI's UI (graph) format, so that ComfyUI's template
browser opens them as graphs; the API prompts the tests queue are derived from them here.

A UI node keeps its widget values as a list (`widgets_values`) in the order the front end builds
widgets: the node definition's inputs in `input_order` (required, then optional) that are widgets
(INT, FLOAT, STRING, BOOLEAN, COMBO), each followed by one extra value when it has
`control_after_generate` (the "fixed/randomize" control). Node definitions come from /object_info
(real host) or harness.node_definitions() (CI: the pack's own schemas + ComfyUI's core nodes).
"""
import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def widget_inputs(definition: dict) -> list:
    """[(input name, has a control value)] for each widget of a node definition, in widgets_values order."""
    out = []
    for section in ("required", "optional"):
        specs = definition["input"].get(section, {})
        for name in definition.get("input_order", {}).get(section, list(specs)):
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                out.append((name, bool(options.get("control_after_generate"))))
    return out


def api_prompt(workflow: dict, definitions: dict) -> dict:
    """The API prompt ({node id: {class_type, inputs}}) that queueing the graph sends."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, has_control in widget_inputs(definitions[node["type"]]):
            inputs[name] = next(values)
            if has_control:
                next(values)
        for name, (_, origin, slot, *_) in linked.items():
            inputs[name] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
