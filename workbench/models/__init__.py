"""Models: generators (the bundled tiny-world model, local diffusers video pipelines) behind one interface,
their loaders, per-architecture adapters, and random-weight pipelines for tests and GPU timing."""
from workbench.models.bundled import BUNDLED, TinyWorldModel, load_bundled, load_from_dir
from workbench.models.generator import GenerationSettings, Generator
from workbench.models.loading import BUNDLED_NAMES, LoadedModel, ModelLoadError, load, load_generator, load_pipeline
from workbench.models.sampler import SamplingConfig, sample
from workbench.models.video_pipeline import PipelineGenerator

__all__ = [
    "BUNDLED", "BUNDLED_NAMES", "GenerationSettings", "Generator", "LoadedModel", "ModelLoadError",
    "PipelineGenerator", "SamplingConfig", "TinyWorldModel", "load", "load_bundled", "load_from_dir",
    "load_generator", "load_pipeline", "sample",
]
