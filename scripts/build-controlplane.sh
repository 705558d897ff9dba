#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kubectl) from the Go modules in tools/controlplane and print the directory
# that contains the binaries.
#
# The versions come from tools/controlplane/*/go.mod. Binaries go to
#   ${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}/controlplane/kubernetes-<v>-etcd-<v>/bin
# and a later run that finds all four there builds nothing. Builds run at
# nice 19 with one package compiled at a time (EVENTRAILS_BUILD_JOBS to change
# that), so a cold build is slow but leaves the machine usable.
#
# The last line on stdout is the binary directory; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/tools/controlplane"

go_bin=${GO:-}
if [[ -z "$go_bin" ]]; then
    go_bin=$(command -v go || true)
    [[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
fi

log() { printf 'build-controlplane: %s\n' "$*" >&2; }

# module_version GO_MOD MODULE: the version GO_MOD requires for MODULE.
module_version() {
    local version
    version=$(awk -v mod="$2" '$1 == mod && $2 ~ /^v/ { print $2; exit }' "$1")
    if [[ -z "$version" ]]; then
        log "no requirement for $2 in $1; restore the require line for it"
        exit 2
    fi
    printf '%s\n' "$version"
}

k8s_version=$(module_version "$tools/kubernetes/go.mod" k8s.io/kubernetes)
etcd_version=$(module_version "$tools/etcd/go.mod" go.etcd.io/etcd/server/v3)
cache=${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}
bin="$cache/controlplane/kubernetes-$k8s_version-etcd-$etcd_version/bin"
binaries=(etcd kube-apiserver kube-controller-manager kubectl)

complete() {
    local name
    for name in "${binaries[@]}"; do
        [[ -x "$bin/$name" ]] || return 1
    done
}

if complete; then
    log "binaries for Kubernetes $k8s_version and etcd $etcd_version already built"
    printf '%s\n' "$bin"
    exit 0
fi

if [[ -z "$go_bin" ]]; then
    log "Go is not installed and $bin is incomplete; install Go 1.26 or newer, or set GO=/path/to/go"
    exit 1
fi

mkdir -p "$bin"
# One build at a time per cache directory: a second caller waits, then finds
# the binaries in place.
exec 9>"$bin/../build.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if complete; then
    log "binaries were built by a concurrent run"
    printf '%s\n' "$bin"
    exit 0
fi

jobs=${EVENTRAILS_BUILD_JOBS:-1}
staging=$(mktemp -d "$bin/../staging.XXXXXX")
trap 'rm -rf "$staging"' EXIT

# Build into a staging directory and move each binary in place only once the
# whole build has succeeded, so an interrupted build leaves nothing half-made.
# build MODULE LDFLAGS OUTPUT PACKAGE...: OUTPUT is a file for one package and
# a directory (ending in /) for several.
build() {
    local module=$1 ldflags=$2 output=$3
    shift 3
    (
        cd "$tools/$module"
        CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local nice -n 19 \
            "$go_bin" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$output" "$@"
    )
}

k8s_minor=${k8s_version#v*.}
k8s_minor=${k8s_minor%%.*}
k8s_major=${k8s_version#v}
k8s_major=${k8s_major%%.*}
version_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_flags+=" -X $pkg.gitVersion=$k8s_version"
    version_flags+=" -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor"
    version_flags+=" -X $pkg.gitTreeState=clean"
done

log "building etcd $etcd_version with $("$go_bin" env GOVERSION), $jobs job(s) at nice 19"
build etcd "-s -w" "$staging/etcd" go.etcd.io/etcd/server/v3

log "building kube-apiserver, kube-controller-manager and kubectl $k8s_version (a cold build takes long)"
build kubernetes "-s -w$version_flags" "$staging/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl

for name in "${binaries[@]}"; do
    mv -f "$staging/$name" "$bin/$name"
done
log "built ${binaries[*]} in $bin"
printf '%s\n' "$bin"
