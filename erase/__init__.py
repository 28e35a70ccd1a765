"""erase: minimalist concept erasure for flow-matching text-to-image models.

The Python API for serving code is `erase.apply_masks` (erase/serving.py): fold registered masks
into a diffusers FLUX pipeline the caller loaded. It is imported on first use, so that
`import erase` (and `erase --help`) stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "apply_masks":
        from erase.serving import apply_masks

        return apply_masks
    raise AttributeError(f"module 'erase' has no attribute {name!r}")
