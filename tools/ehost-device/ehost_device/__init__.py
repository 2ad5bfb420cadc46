"""ehost-device: the CNI plugin that plumbs an allocated virtio NIC into a pod.

What every entry needs before it knows which way a call goes lives here, so that it imports
nothing else: the CNI versions and the VERSION answer (`cli` alone answers VERSION, the executor
answers `probe`), and where the warm executor listens by default (the front and the node policy
both need it).
"""

__version__ = "0.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]

DEFAULT_SOCKET = "/run/virtdp/ehost-device.sock"


def version_answer(data: bytes) -> str:
    """The VERSION answer (stdout text) to the config `data`."""
    from ehost_device import lean_json

    version = LATEST
    try:
        asked = lean_json.loads(data.decode("utf-8")) if data.strip() else {}
        # Echo the caller's version (spec 1.1, "VERSION Success"), but never an empty one:
        # libcni's decoder rejects a VERSION answer whose cniVersion is "".
        if isinstance(asked, dict) and isinstance(asked.get("cniVersion"), str):
            version = asked["cniVersion"].strip() or version
    except (UnicodeDecodeError, ValueError):
        pass
    answer = {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    return lean_json.dumps(answer) + "\n"
