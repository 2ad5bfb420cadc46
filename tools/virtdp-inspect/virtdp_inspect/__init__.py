"""virtdp-inspect: the operator's debugging CLI (allocations, plugin devices, the kubelet
checkpoint, and where every plumbed NIC is)."""

__version__ = "0.1.0"
