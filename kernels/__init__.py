"""Triton kernels with autograd wrappers and plain-PyTorch references beside them."""

from .loss import fd_loss, fd_loss_reference, triton_available

__all__ = ["fd_loss", "fd_loss_reference", "triton_available"]
