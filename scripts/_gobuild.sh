# Shared steps of the scripts that build pinned Go tools into the cache.
# Sourced, not run: the caller sets `set -euo pipefail` and then calls
#   gobuild_setup NAME        NAME prefixes the progress lines on stderr
#   module_version GO_MOD MODULE
#   gobuild_lock BIN CHECK    returns 0 when another run built it meanwhile
#   go_build MODULE_DIR LDFLAGS OUTPUT PACKAGE...
# Builds run at nice 19 with EVENTRAILS_BUILD_JOBS packages compiled at a time
# (1 by default), so a cold build is slow but leaves the machine usable.

gobuild_setup() {
    gobuild_name=$1
    go_bin=${GO:-}
    if [[ -z "$go_bin" ]]; then
        go_bin=$(command -v go || true)
        [[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
    fi
    cache=${EVENTRAILS_CACHE:-$HOME/.cache/eventrails}
    jobs=${EVENTRAILS_BUILD_JOBS:-1}
}

log() { printf '%s: %s\n' "$gobuild_name" "$*" >&2; }

# module_version GO_MOD MODULE: print the version GO_MOD requires for MODULE.
module_version() {
    local version
    version=$(awk -v mod="$2" '$1 == mod && $2 ~ /^v/ { print $2; exit }' "$1")
    if [[ -z "$version" ]]; then
        log "no requirement for $2 in $1; restore the require line for it"
        exit 2
    fi
    printf '%s\n' "$version"
}

# gobuild_lock BIN CHECK: check that Go is there, create BIN and take the build
# lock of its cache directory, so a second caller waits and then finds the
# binaries in place. Returns 0 when CHECK (a command) finds them built by a
# concurrent run, 1 when the caller has to build. Sets `staging`, a temporary
# directory next to BIN that is removed on exit.
gobuild_lock() {
    local bin=$1 check=$2
    if [[ -z "$go_bin" ]] || ! command -v "$go_bin" >/dev/null; then
        log "Go is not installed${go_bin:+ at $go_bin} and $bin is incomplete; install Go 1.26 or newer, or set GO=/path/to/go"
        exit 1
    fi
    mkdir -p "$bin"
    exec 9>"$bin/../build.lock"
    if command -v flock >/dev/null; then
        flock 9
    fi
    if "$check"; then
        log "built by a concurrent run"
        return 0
    fi
    staging=$(mktemp -d "$bin/../staging.XXXXXX")
    trap 'rm -rf "$staging"' EXIT
    log "building with $("$go_bin" env GOVERSION), $jobs job(s) at nice 19"
    return 1
}

# go_build MODULE_DIR LDFLAGS OUTPUT PACKAGE...: build from the go.mod in
# MODULE_DIR, with the modules it pins and the local toolchain. OUTPUT is a file
# for one package and a directory (ending in /) for several. Callers build into
# $staging and move the binaries in place only once every build succeeded, so
# an interrupted build leaves nothing half-made.
go_build() {
    local module_dir=$1 ldflags=$2 output=$3
    shift 3
    (
        cd "$module_dir"
        CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local nice -n 19 \
            "$go_bin" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$output" "$@"
    )
}
