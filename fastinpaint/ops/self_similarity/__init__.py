"""Self-similarity maps and the spatially-correlative distance (F-LSeSim)."""

from .op import sample_query_index, self_similarity, spatial_correlative_distance

__all__ = ["sample_query_index", "self_similarity", "spatial_correlative_distance"]
