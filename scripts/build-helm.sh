#!/usr/bin/env bash
# Build the helm command from the Go module in tools/helm and print the
# directory that contains it.
#
# The version comes from the helm.sh/helm/v4 requirement in tools/helm/go.mod.
# The binary goes to
#   ${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}/helm/<version>/bin/helm
# and a later run that finds it there builds nothing. The build runs at nice 19
# with one package compiled at a time (EVENTRAILS_BUILD_JOBS to change that),
# so a cold build is slow but leaves the machine usable.
#
# The last line on stdout is the binary directory; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
module_dir="$root/tools/helm"

go_bin=${GO:-}
if [[ -z "$go_bin" ]]; then
    go_bin=$(command -v go || true)
    [[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
fi

log() { printf 'build-helm: %s\n' "$*" >&2; }

version=$(awk '$1 == "helm.sh/helm/v4" && $2 ~ /^v/ { print $2; exit }' "$module_dir/go.mod")
if [[ -z "$version" ]]; then
    log "no requirement for helm.sh/helm/v4 in $module_dir/go.mod; restore the require line for it"
    exit 2
fi
cache=${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}
bin="$cache/helm/$version/bin"

if [[ -x "$bin/helm" ]]; then
    log "helm $version already built"
    printf '%s\n' "$bin"
    exit 0
fi

if [[ -z "$go_bin" ]] || ! command -v "$go_bin" >/dev/null; then
    log "Go is not installed${go_bin:+ at $go_bin} and $bin/helm is missing; install Go 1.26 or newer, or set GO=/path/to/go"
    exit 1
fi

mkdir -p "$bin"
# One build at a time per version: a second caller waits, then finds the
# binary in place.
exec 9>"$bin/../build.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if [[ -x "$bin/helm" ]]; then
    log "helm $version was built by a concurrent run"
    printf '%s\n' "$bin"
    exit 0
fi

jobs=${EVENTRAILS_BUILD_JOBS:-1}
staging=$(mktemp -d "$bin/../staging.XXXXXX")
trap 'rm -rf "$staging"' EXIT

# The same version stamp as helm's own release build, so `helm version`
# reports the pinned release.
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version"
ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

log "building helm $version with $("$go_bin" env GOVERSION), $jobs job(s) at nice 19"
(
    cd "$module_dir"
    CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local nice -n 19 \
        "$go_bin" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$staging/helm" helm.sh/helm/v4/cmd/helm
)

# Move the binary in place only once the build has succeeded, so an
# interrupted build leaves nothing half-made.
mv -f "$staging/helm" "$bin/helm"
log "built helm in $bin"
printf '%s\n' "$bin"
