"""Models: the bundled tiny video DiT, its sampler, and loaders for local diffusers checkpoints."""
from workbench.models.bundled import BUNDLED, TinyWorldModel, load_bundled, load_from_dir
from workbench.models.loading import BUNDLED_NAMES, LoadedModel, ModelLoadError, load, load_pipeline
from workbench.models.sampler import SamplingConfig, sample

__all__ = [
    "BUNDLED", "BUNDLED_NAMES", "LoadedModel", "ModelLoadError", "SamplingConfig", "TinyWorldModel",
    "load", "load_bundled", "load_from_dir", "load_pipeline", "sample",
]
