"""The kubelet's gRPC APIs (device plugin v1beta1, pod-resources v1): protos, channels, clients."""
