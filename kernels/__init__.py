"""Triton kernels with autograd wrappers and plain-PyTorch references beside them."""

from .fd_loss import fd_loss, fd_loss_reference, triton_available

__all__ = ["fd_loss", "fd_loss_reference", "triton_available"]
