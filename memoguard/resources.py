"""Files shipped inside the package (memoguard/assets), found through importlib.resources rather than
paths relative to a module, so they resolve wherever and however the package is installed."""
import atexit
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

from .errors import MemoGuardError

_EXTRACTED = ExitStack()  # assets copied out of a non-folder install stay there until the process ends
atexit.register(_EXTRACTED.close)


def asset_path(*parts: str) -> Path:
    """The concrete path of memoguard/assets/<parts...> (a file or a folder); MemoGuardError if it is missing."""
    asset = resources.files("memoguard.assets")
    for part in parts:  # one name at a time: Python 3.10's Traversable.joinpath takes one
        asset = asset.joinpath(part)
    name = "/".join(("memoguard", "assets") + parts)
    if not (asset.is_file() or asset.is_dir()):
        raise MemoGuardError(f"{name} is missing from this MemoGuard install; reinstall the package "
                             "(or restore the folder from the repository)")
    if isinstance(asset, Path):  # the usual case: the package is a folder on disk
        return asset
    try:  # e.g. a zip import: a temporary copy (folders need Python 3.12)
        return _EXTRACTED.enter_context(resources.as_file(asset))
    except Exception as exc:
        raise MemoGuardError(f"{name} cannot be read as a file from this install ({exc}); install "
                             "MemoGuard as a folder (pip install, or the repository checkout)") from exc
