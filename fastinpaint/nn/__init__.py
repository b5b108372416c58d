"""Drop-in modules: they own parameters and call fastinpaint's ops."""

from .gated_conv import GatedConv2d, GatedDeconv2d

__all__ = ["GatedConv2d", "GatedDeconv2d"]
