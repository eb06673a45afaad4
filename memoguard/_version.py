"""MemoGuard's version, the one value the core (memoguard.__version__), the ComfyUI pack and the WebUI
extension report. Kept a plain literal with no imports, so the host entries can read it by path.

pyproject.toml repeats it as a static `[project] version` because ComfyUI-Manager reads that field
without running any code; tests/test_packaging.py fails when the two differ.
"""
__version__ = "0.1.0"
