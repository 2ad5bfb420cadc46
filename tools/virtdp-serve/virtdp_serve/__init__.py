"""virtdp-serve: the kubelet device plugin daemon that advertises the node's virtio NICs."""

__version__ = "0.1.0"
