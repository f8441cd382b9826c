#!/usr/bin/env bash
# The component image (infra/Dockerfile), built with docker or podman, whichever works.
#
#   infra/image.sh build          build IMAGE:TAG (TAG = git short SHA, -dirty for a dirty tree); prints tag and size
#   infra/image.sh tag            print the tag `build` gives (what pipeline.py puts in the IR)
#   infra/image.sh push REGISTRY  push IMAGE:TAG as REGISTRY/<name>:TAG (host[:port]/path; make image-push);
#                                 refuses a dirty tree's tag; prints the pushed name for kfp.image
#   infra/image.sh engine         print the engine used (docker | podman), or say what to install
#   infra/image.sh base           print the base image `build` uses, making the local Debian one if needed
#   infra/image.sh api start|stop|status|env
#                                 podman's Docker-compatible API socket, which kfp's DockerRunner
#                                 (python pipeline.py run --runner docker) talks to; started and
#                                 stopped by PID; `env` prints the DOCKER_HOST to export
#
# Settings (environment, defaults in brackets): IMAGE [mofe-ood], CONTAINER_ENGINE [auto:
# docker if its daemon answers, else podman], BASE_IMAGE [nvidia/cuda:12.8.1-base-ubuntu24.04;
# when it is neither present nor pullable, LOCAL_BASE is made with debootstrap], LOCAL_BASE
# [localhost/mofe-debian:bookworm], DEBIAN_MIRROR [the one apt uses here], CONTAINERS_CONF
# [infra/containers.conf for podman], CONTAINER_SOCKET [.services/podman.sock].
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-mofe-ood}"
BASE_IMAGE="${BASE_IMAGE:-nvidia/cuda:12.8.1-base-ubuntu24.04}"
LOCAL_BASE="${LOCAL_BASE:-localhost/mofe-debian:bookworm}"
SERVICES_DIR="${SERVICES_DIR:-$ROOT/.services}"
SOCKET="${CONTAINER_SOCKET:-$SERVICES_DIR/podman.sock}"
API_PID="$SERVICES_DIR/podman-api.pid"
API_LOG="$SERVICES_DIR/podman-api.log"

die() { echo "image.sh: error: $*" >&2; exit 1; }
say() { echo "image.sh: $*" >&2; }

# podman in a container sandbox needs runc, cgroupfs and explicit ulimits (see the file); the
# same settings work on an ordinary host. A CONTAINERS_CONF of the user's own wins.
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/infra/containers.conf}"

engine() {
    if [[ -n "${CONTAINER_ENGINE:-}" ]]; then
        command -v "$CONTAINER_ENGINE" >/dev/null || die "CONTAINER_ENGINE=$CONTAINER_ENGINE is not installed"
        echo "$CONTAINER_ENGINE"
    # A docker client alone is not enough: its daemon must answer.
    elif command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null && timeout 30 podman info >/dev/null 2>&1; then
        echo podman
    elif command -v podman >/dev/null; then
        die "podman is installed but 'podman info' fails (CONTAINERS_CONF=$CONTAINERS_CONF): run it to see why"
    else
        die "no container engine: install podman (Debian/Ubuntu as root: apt-get install podman runc)" \
            "or Docker with a running daemon ('docker info' must answer)"
    fi
}

tag() {
    git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
        die "$ROOT is not a git checkout: the image tag is the commit (set MOFE_IMAGE to name an image)"
    local sha
    sha="$(git -C "$ROOT" rev-parse --short=12 HEAD)"
    # Dirty = the image would not be that commit's code: tracked files differ from the commit, or
    # files git does not track (and does not ignore) sit in the package the image copies.
    if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ||
          -n "$(git -C "$ROOT" status --porcelain --untracked-files=all -- mofe_ood)" ]]; then
        sha="$sha-dirty"
    fi
    echo "$sha"
}

has_image() { "$1" image inspect "$2" >/dev/null 2>&1; }

debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri="$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security |
           head -n 1 | awk '{print $2}')" || true
    [[ -n "$uri" ]] || uri="$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | head -n 1 |
                              awk '{print $2}')" || true
    echo "${uri:-http://deb.debian.org/debian}"
}

# make_local_base ENGINE: a minimal Debian bookworm (Python 3.11, as the local torch wheels want).
make_local_base() {
    local eng=$1 rootfs mirror
    command -v debootstrap >/dev/null ||
        die "no base image can be pulled and debootstrap is missing: apt-get install debootstrap" \
            "(or set BASE_IMAGE to an image this engine has)"
    [[ "$(id -u)" == 0 ]] || die "making the local Debian base needs root (debootstrap); or set BASE_IMAGE"
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d)"
    say "no registry reachable: making $LOCAL_BASE with debootstrap from $mirror (about a minute)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
        { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs"; die "debootstrap failed (log above)"; }
    tar -C "$rootfs" -c . | "$eng" import - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
}

base() {
    local eng=$1
    if has_image "$eng" "$BASE_IMAGE"; then echo "$BASE_IMAGE"; return; fi
    if timeout 120 "$eng" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then echo "$BASE_IMAGE"; return; fi
    has_image "$eng" "$LOCAL_BASE" || make_local_base "$eng"
    say "base: $LOCAL_BASE ($BASE_IMAGE cannot be pulled here)"
    echo "$LOCAL_BASE"
}

# pip_setting NAME ENV_VAR: the host's pip setting (environment first, then pip's config files).
pip_setting() {
    if [[ -n "${!2:-}" ]]; then echo "${!2}"; return; fi
    python3 -m pip config get "global.$1" 2>/dev/null || true
}

build() {
    local eng base_image tag commit index links cert args=() dir secrets
    eng="$(engine)"
    base_image="$(base "$eng")"
    tag="$(tag)"
    commit="$(git -C "$ROOT" rev-parse HEAD)"
    [[ "$tag" == *-dirty ]] && commit="$commit-dirty"
    args+=(--build-arg "BASE_IMAGE=$base_image" --build-arg "GIT_COMMIT=$commit")
    # The host's pip settings, only where it has them: local indexes and wheel folders are
    # mounted read-only (podman can mount in a build; docker cannot, and a normal machine
    # reaches PyPI anyway); the CA bundle is a build secret.
    index="$(pip_setting extra-index-url PIP_EXTRA_INDEX_URL)"
    links="$(pip_setting find-links PIP_FIND_LINKS)"
    cert="$(pip_setting cert PIP_CERT)"
    # Index URLs and wheel folders are build secrets, never build args: a URL can carry a token,
    # and a build arg stays in the image's history. Each value goes through a mode-600 file that
    # is removed when the build ends.
    secrets="$(mktemp -d)"
    trap 'rm -rf "${secrets:-}"' RETURN EXIT
    [[ -n "$index" ]] && printf '%s' "$index" >"$secrets/pipindex" && args+=(--secret "id=pipindex,src=$secrets/pipindex")
    [[ -n "$links" ]] && printf '%s' "$links" >"$secrets/piplinks" && args+=(--secret "id=piplinks,src=$secrets/piplinks")
    [[ -n "$cert" && -f "$cert" ]] && args+=(--secret "id=pipca,src=$cert")
    if [[ "$eng" == podman ]]; then
        for dir in $index $links; do
            dir="${dir#file://}"
            [[ "$dir" == /* ]] || continue
            [[ "$dir" == */simple ]] && dir="${dir%/simple}"  # the index's files sit beside simple/
            if [[ -d "$dir" ]]; then args+=(-v "$dir:$dir:ro"); fi
        done
    fi
    say "building $IMAGE:$tag with $eng (base $base_image)"
    local start=$SECONDS
    "$eng" build --network=host -f "$ROOT/infra/Dockerfile" "${args[@]}" -t "$IMAGE:$tag" "$ROOT" >&2
    local size
    size="$("$eng" image inspect "$IMAGE:$tag" --format '{{.Size}}')"
    say "built in $((SECONDS - start)) s"
    awk -v name="$IMAGE:$tag" -v size="$size" 'BEGIN { printf "%s\t%.2f GB\n", name, size / 1e9 }'
}

push() {
    local registry="${1:-}" eng tag target tls=()
    [[ -n "$registry" ]] || die "push: name the registry: infra/image.sh push host[:port]/path (make image-push REGISTRY=...)"
    tag="$(tag)"
    # A -dirty tag names no commit's code: a cluster must never run it (pipeline.py submit refuses it too).
    [[ "$tag" != *-dirty ]] || die "push: the tree is dirty ($tag): commit, then make image and push"
    eng="$(engine)"
    has_image "$eng" "$IMAGE:$tag" || die "push: $IMAGE:$tag is not built here: make image first"
    target="${registry%/}/${IMAGE##*/}:$tag"
    # A registry on loopback (a workstation's distribution registry) speaks plain HTTP.
    if [[ "$eng" == podman && ( "$registry" == localhost[:/]* || "$registry" == 127.0.0.1[:/]* ) ]]; then
        tls=(--tls-verify=false)
    fi
    "$eng" tag "$IMAGE:$tag" "$target"
    "$eng" push "${tls[@]}" "$target" >&2
    say "pushed $target: set kfp.image: ${target%:*} (submit adds the tag)"
    echo "$target"
}

api_alive() {
    [[ -f "$API_PID" ]] && kill -0 "$(cat "$API_PID")" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$(cat "$API_PID")/cmdline" 2>/dev/null | grep -q "system service"
}

api() {
    case "${1:-}" in
        start)
            if [[ "$(engine)" == docker ]]; then say "docker's daemon serves the API: nothing to start"; return; fi
            if api_alive; then say "podman API already running (pid $(cat "$API_PID")) at unix://$SOCKET"; return; fi
            mkdir -p "$SERVICES_DIR"
            rm -f "$SOCKET"
            # exec: the PID file names podman itself, which `stop` signals.
            setsid bash -c 'echo $$ >"$0"; exec podman system service --time=0 "unix://$1"' \
                "$API_PID" "$SOCKET" </dev/null >"$API_LOG" 2>&1 &
            local i
            for ((i = 0; i < 100; i++)); do
                [[ -S "$SOCKET" ]] && curl -fsS -o /dev/null --unix-socket "$SOCKET" http://d/_ping 2>/dev/null &&
                    { say "podman API running (pid $(cat "$API_PID")) at unix://$SOCKET"; return; }
                sleep 0.2
            done
            die "podman API did not answer on $SOCKET within 20 s; see $API_LOG"
            ;;
        stop)
            if api_alive; then
                kill -TERM "$(cat "$API_PID")"
                say "podman API stopped (pid $(cat "$API_PID"))"
            else
                say "podman API not running"
            fi
            rm -f "$API_PID" "$SOCKET"
            ;;
        status)
            if api_alive; then echo "podman API: running (pid $(cat "$API_PID")) at unix://$SOCKET"
            else echo "podman API: not running"; exit 3; fi
            ;;
        env)
            if api_alive; then printf 'export DOCKER_HOST=%q\n' "unix://$SOCKET"; fi
            ;;
        *) die "api: expected start, stop, status or env" ;;
    esac
}

cmd="${1:-}"
shift || true
case "$cmd" in
    build) build ;;
    tag) tag ;;
    push) push "$@" ;;
    engine) engine ;;
    base) base "$(engine)" ;;
    api) api "$@" ;;
    *) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
