"""virtdp-discover: show the node's virtio NICs, which may be handed to pods, and their pools."""

__version__ = "0.1.0"
