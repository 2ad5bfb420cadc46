"""ehost-device: the CNI plugin that plumbs an allocated virtio NIC into a pod.

The CNI versions live here so that VERSION, answered by `cli` alone, imports nothing else.
"""

__version__ = "0.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
