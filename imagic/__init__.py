"""imagic: edit a real photo from one sentence (Imagic, Kawar et al., CVPR 2023)."""

__version__ = "0.1.0"

_EXPORTS = {
    "ImagicEditor": "editor", "SampleOutput": "editor", "EditState": "state",
    "TrainSettings": "settings", "StageSettings": "settings", "SampleSettings": "settings",
}


def __getattr__(name: str):
    # Lazy, so that `import imagic.errors` (and the CLI's start-up settings) come before diffusers loads.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'imagic' has no attribute {name!r}")
