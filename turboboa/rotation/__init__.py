"""Outlier suppression by rotation (QuaRot): Hadamard and random orthogonal matrices, their fusion into the
weights of a Llama-family model, and the online rotations that weight-activation quantization adds."""

from .fuse import ROTATIONS, rotate_model
from .hadamard import HadamardTransform, hadamard_matrix, random_orthogonal, randomized_hadamard
from .online import install_online_down

__all__ = ["ROTATIONS", "HadamardTransform", "hadamard_matrix", "install_online_down", "random_orthogonal",
           "randomized_hadamard", "rotate_model"]
