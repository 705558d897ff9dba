#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kubectl) from the Go modules in tools/controlplane and print the directory
# that contains the binaries.
#
# The versions come from tools/controlplane/*/go.mod. Binaries go to
#   ${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}/controlplane/kubernetes-<v>-etcd-<v>/bin
# and a later run that finds all four there builds nothing. See
# scripts/_gobuild.sh for the build settings.
#
# The last line on stdout is the binary directory; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/_gobuild.sh
source "$root/scripts/_gobuild.sh"
gobuild_setup build-controlplane
tools="$root/tools/controlplane"

k8s_version=$(module_version "$tools/kubernetes/go.mod" k8s.io/kubernetes)
etcd_version=$(module_version "$tools/etcd/go.mod" go.etcd.io/etcd/server/v3)
bin="$cache/controlplane/kubernetes-$k8s_version-etcd-$etcd_version/bin"
binaries=(etcd kube-apiserver kube-controller-manager kubectl)

built() {
    local name
    for name in "${binaries[@]}"; do
        [[ -x "$bin/$name" ]] || return 1
    done
}

if built; then
    log "binaries for Kubernetes $k8s_version and etcd $etcd_version already built"
elif ! gobuild_lock "$bin" built; then
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

    log "building etcd $etcd_version"
    go_build "$tools/etcd" "-s -w" "$staging/etcd" go.etcd.io/etcd/server/v3

    log "building kube-apiserver, kube-controller-manager and kubectl $k8s_version (a cold build takes long)"
    go_build "$tools/kubernetes" "-s -w$version_flags" "$staging/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kubectl

    for name in "${binaries[@]}"; do
        mv -f "$staging/$name" "$bin/$name"
    done
    log "built ${binaries[*]} in $bin"
fi
printf '%s\n' "$bin"
