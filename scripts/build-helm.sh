#!/usr/bin/env bash
# Build the helm command from the Go module in tools/helm and print the
# directory that contains it.
#
# The version comes from the helm.sh/helm/v4 requirement in tools/helm/go.mod.
# The binary goes to
#   ${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}/helm/<version>/bin/helm
# and a later run that finds it there builds nothing. See scripts/_gobuild.sh
# for the build settings.
#
# The last line on stdout is the binary directory; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/_gobuild.sh
source "$root/scripts/_gobuild.sh"
gobuild_setup build-helm
module_dir="$root/tools/helm"

version=$(module_version "$module_dir/go.mod" helm.sh/helm/v4)
bin="$cache/helm/$version/bin"
built() { [[ -x "$bin/helm" ]]; }

if built; then
    log "helm $version already built"
elif ! gobuild_lock "$bin" built; then
    # The same version stamp as helm's own release build, so `helm version`
    # reports the pinned release.
    ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version"
    ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
    log "building helm $version"
    go_build "$module_dir" "$ldflags" "$staging/helm" helm.sh/helm/v4/cmd/helm
    mv -f "$staging/helm" "$bin/helm"
    log "built helm in $bin"
fi
printf '%s\n' "$bin"
