"""Histology: whole-slide tiling on SpatialData, patch encoders, STFlow, the GPU pool.

Names load on first use (torch and spatialdata are heavy), e.g.::

    from dflashdeconv import histo
    slide = histo.open_slide("C2_HE.jpg", spots=adata)
    model = histo.train_expression_model([slide], genes=50)
"""

import importlib

_EXPORTS = {
    "open_slide": "slide", "add_spots": "slide", "spots_table": "slide",
    "slide_image": "slide", "detect_tissue": "tissue", "tile_grid": "tissue",
    "TileSpec": "slide", "SlideImage": "slide", "TissueMask": "tissue",
    "get_encoder": "encoders", "register_encoder": "encoders",
    "available_encoders": "encoders", "Encoder": "encoders",
    "STFlow": "stflow",
    "gpu_workers": "devices", "task_device": "devices",
    "train_expression_model": "predict", "predict_expression": "predict",
    "synthetic_slide": "synthetic",
    "estimate_stains": "stain", "normalize_stains": "stain", "StainEstimate": "stain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dflashdeconv.histo' has no attribute {name!r}")


def __dir__():
    return __all__
