"""virtcore: the library under the virtdp tools (discovery, pools, netns plumbing, kubelet APIs)."""

__version__ = "0.1.0"
