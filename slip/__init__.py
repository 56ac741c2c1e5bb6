"""slip: language-image pretraining with self-supervision (SLIP, Mu et al. 2021)."""
from .checkpoint import load_pretrained, save_checkpoint
from .models import SLIPModel, create_model, list_models
from .tokenizer import get_tokenizer

__version__ = "0.1.0"
__all__ = ["SLIPModel", "create_model", "get_tokenizer", "list_models", "load_pretrained", "save_checkpoint"]
