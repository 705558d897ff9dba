#!/usr/bin/env bash
# Build the nats command (natscli) from the Go module in tools/natscli and print
# the directory that contains it. The benchmarks run `nats bench` with it to
# show what the server itself sustains next to the Python figures.
#
# The version comes from the github.com/nats-io/natscli requirement in
# tools/natscli/go.mod. The binary goes to
#   ${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}/natscli/<version>/bin/nats
# and a later run that finds it there builds nothing. See scripts/_gobuild.sh
# for the build settings.
#
# The last line on stdout is the binary directory; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/_gobuild.sh
source "$root/scripts/_gobuild.sh"
gobuild_setup build-natscli
module_dir="$root/tools/natscli"

version=$(module_version "$module_dir/go.mod" github.com/nats-io/natscli)
bin="$cache/natscli/$version/bin"
built() { [[ -x "$bin/nats" ]]; }

if built; then
    log "natscli $version already built"
elif ! gobuild_lock "$bin" built; then
    log "building natscli $version"
    go_build "$module_dir" "-s -w" "$staging/nats" github.com/nats-io/natscli/nats
    mv -f "$staging/nats" "$bin/nats"
    log "built nats in $bin"
fi
printf '%s\n' "$bin"
