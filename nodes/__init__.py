"""ComfyUI adapter: host glue only; every number comes from the `memoguard` core.

Modules named nodes_*.py define the V3 nodes and import ComfyUI; the others (hooks, the
DiffusionModel adapter, plots, live events) only duck-type ComfyUI's objects, so CI tests them
against tests/comfyui/harness.py without a ComfyUI checkout.
"""
