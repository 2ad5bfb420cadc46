#!/bin/sh
# Install one CNI plugin file into a CNI bin directory atomically.
#
#   install-cni.sh SOURCE BIN_DIR [NAME]
#
# The file gets mode 0755 (a plugin), or INSTALL_MODE from the environment (0644 for the node
# policy file, which the DaemonSet installs the same way into /etc/virtdp).
#
# The runtime may exec BIN_DIR/NAME at any moment, also while this runs. So the file is never
# written in place: the copy goes to a temporary file in BIN_DIR itself (same filesystem), is
# fsynced, made executable, and then renamed over NAME. rename(2) swaps the directory entry in
# one step: every exec sees the complete old file or the complete new one, and a plugin that is
# running keeps its own (old) inode, so there is no "Text file busy" and no half-written plugin.
# The directory is fsynced last so the new entry survives a power cut.
#
# Idempotent: when BIN_DIR/NAME already has SOURCE's content, nothing changes.
# Messages go to stderr; exit status 0 = installed or already current, 2 = bad input, 1 = failed.
set -eu

prog=install-cni

die() { # status, message
    echo "$prog: $2" >&2
    exit "$1"
}

[ "$#" -ge 2 ] && [ "$#" -le 3 ] ||
    die 2 "expected 2 or 3 arguments: SOURCE BIN_DIR [NAME], got $#"

src=$1
dir=${2%/}
[ -n "$dir" ] || dir=/
name=${3:-$(basename -- "$src")}

[ -f "$src" ] && [ -r "$src" ] ||
    die 2 "SOURCE '$src': not found or not readable, expected a readable regular file"
[ -s "$src" ] || die 2 "SOURCE '$src': is empty, expected the plugin executable"
[ -d "$dir" ] || die 2 "BIN_DIR '$dir': not a directory, expected the host's CNI bin directory"
[ -w "$dir" ] || die 2 "BIN_DIR '$dir': not writable, expected write access (run as root)"
case $name in
    "" | . | .. | .* | */*)
        die 2 "NAME '$name': expected a plain file name without '/' and not starting with '.'" ;;
esac

dest=$dir/$name
[ ! -d "$dest" ] ||
    die 2 "'$dest' is a directory, expected a plugin file (or nothing) at that path"

if [ -f "$dest" ] && cmp -s -- "$src" "$dest"; then
    echo "$prog: $dest is already current" >&2
    exit 0
fi

# Temporary files of earlier runs that died before the rename; a recent one may belong to an
# installer running right now (rolling update), so only old ones go.
find "$dir" -maxdepth 1 -name ".$name.install.*" -type f -mmin +10 -exec rm -f -- {} + \
    2>/dev/null || true

tmp=$(mktemp -- "$dir/.$name.install.XXXXXX") ||
    die 1 "cannot create a temporary file in '$dir'"
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM

cp -- "$src" "$tmp" || die 1 "copying '$src' to '$tmp' failed"
chmod "${INSTALL_MODE:-0755}" "$tmp" || die 2 "INSTALL_MODE '${INSTALL_MODE:-}': expected an octal mode such as 0644"
sync -- "$tmp" || die 1 "fsync of '$tmp' failed"
mv -f -- "$tmp" "$dest" || die 1 "renaming '$tmp' to '$dest' failed"
trap - EXIT
sync -- "$dir" || die 1 "fsync of '$dir' failed"
echo "$prog: installed $src as $dest" >&2
