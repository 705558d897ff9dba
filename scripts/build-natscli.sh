#!/usr/bin/env bash
# Build the nats command (natscli) from the Go module in tools/natscli and print
# the directory that contains it. The benchmarks run `nats bench` with it to
# show what the server itself sustains next to the Python figures.
#
# The version comes from the github.com/nats-io/natscli requirement in
# tools/natscli/go.mod. The binary goes to
#   ${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}/natscli/<version>/bin/nats
# and a later run that finds it there builds nothing. The build runs at nice 19
# with one package compiled at a time (EVENTRAILS_BUILD_JOBS to change that),
# so a cold build is slow but leaves the machine usable.
#
# The last line on stdout is the binary directory; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
module_dir="$root/tools/natscli"

go_bin=${GO:-}
if [[ -z "$go_bin" ]]; then
    go_bin=$(command -v go || true)
    [[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
fi

log() { printf 'build-natscli: %s\n' "$*" >&2; }

version=$(awk '$1 == "github.com/nats-io/natscli" && $2 ~ /^v/ { print $2; exit }' "$module_dir/go.mod")
if [[ -z "$version" ]]; then
    log "no requirement for github.com/nats-io/natscli in $module_dir/go.mod; restore the require line for it"
    exit 2
fi
cache=${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}
bin="$cache/natscli/$version/bin"

if [[ -x "$bin/nats" ]]; then
    log "natscli $version already built"
    printf '%s\n' "$bin"
    exit 0
fi

if [[ -z "$go_bin" ]] || ! command -v "$go_bin" >/dev/null; then
    log "Go is not installed${go_bin:+ at $go_bin} and $bin/nats is missing; install Go 1.26 or newer, or set GO=/path/to/go"
    exit 1
fi

mkdir -p "$bin"
# One build at a time per version: a second caller waits, then finds the
# binary in place.
exec 9>"$bin/../build.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if [[ -x "$bin/nats" ]]; then
    log "natscli $version was built by a concurrent run"
    printf '%s\n' "$bin"
    exit 0
fi

jobs=${EVENTRAILS_BUILD_JOBS:-1}
staging=$(mktemp -d "$bin/../staging.XXXXXX")
trap 'rm -rf "$staging"' EXIT

log "building natscli $version with $("$go_bin" env GOVERSION), $jobs job(s) at nice 19"
(
    cd "$module_dir"
    CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local nice -n 19 \
        "$go_bin" build -p "$jobs" -trimpath -ldflags "-s -w" -o "$staging/nats" github.com/nats-io/natscli/nats
)

# Move the binary in place only once the build has succeeded, so an
# interrupted build leaves nothing half-made.
mv -f "$staging/nats" "$bin/nats"
log "built nats in $bin"
printf '%s\n' "$bin"
