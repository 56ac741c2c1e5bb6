"""Model architectures: presets (data), towers and the composed SLIP model."""
from .model import SLIPModel, create_model
from .presets import MODELS, Architecture, SSLHeadConfig, TextConfig, VisionConfig, get_architecture, list_models

__all__ = [
    "MODELS", "Architecture", "SLIPModel", "SSLHeadConfig", "TextConfig", "VisionConfig",
    "create_model", "get_architecture", "list_models",
]
