"""Networks; independent of the federation (a centralized user can take them alone)."""

from models.dual_stream import (
    DualStreamNet,
    build_model,
    check_backbone,
    check_pretrained,
    load_pretrained,
    state_mismatch,
)

__all__ = ["DualStreamNet", "build_model", "check_backbone", "check_pretrained", "load_pretrained", "state_mismatch"]
