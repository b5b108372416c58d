"""The blocked contextual attention's fused scores (DeepFill v2): reference, C++ (CPU)."""
