"""Networks; independent of the federation (a centralized user can take them alone)."""
from models.dual_stream import DualStreamNet, build_model, check_backbone, load_pretrained

__all__ = ["DualStreamNet", "build_model", "check_backbone", "load_pretrained"]
